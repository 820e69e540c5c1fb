//! Merging partial attention results through their log-sum-exps.
//!
//! If the keys of a row are split into parts and part `k` gives the normalised output `o_k` and the
//! log-sum-exp `lse_k` of its own scores, the whole row's result is
//!
//! ```text
//! lse = log(sum_k exp(lse_k)),    o = sum_k exp(lse_k - lse) · o_k
//! ```
//!
//! computed as `m = max_k lse_k`, `w_k = exp(lse_k - m)`, `lse = m + log(sum w_k)`, `o = sum w_k o_k /
//! sum w_k`. This is exactly the combine step of split-KV decoding (there the parts are key ranges of one
//! sequence handled by different thread blocks; here they are the key chunks a row meets as K/V travel
//! round the ring). A part that saw no key has `lse_k = -inf` and weight 0; a row whose parts all saw no
//! key gets `o = 0` and `lse = -inf`, as the spec asks of an empty row. Everything is `f32`.

use crate::error::{Error, Result};

fn check(arg: &'static str, o: usize, lse: usize, d: usize) -> Result<()> {
    if d == 0 || o != lse * d {
        return Err(Error::invalid(arg, format!("{lse} rows of {d} values (lse has {lse} rows)"), o));
    }
    Ok(())
}

/// Merges one part into a running result, row by row: row `r` is `o[r·d .. (r+1)·d]` with log-sum-exp
/// `lse[r]`. Start from `o = 0`, `lse = -inf` (no key seen yet). Same maths as [`combine`] of the two.
pub fn merge_into(o: &mut [f32], lse: &mut [f32], o_part: &[f32], lse_part: &[f32], d: usize) -> Result<()> {
    check("o", o.len(), lse.len(), d)?;
    check("o_part", o_part.len(), lse_part.len(), d)?;
    if lse_part.len() != lse.len() {
        return Err(Error::invalid("lse_part", format!("{} rows (as lse)", lse.len()), lse_part.len()));
    }
    for (r, (l, &lp)) in lse.iter_mut().zip(lse_part).enumerate() {
        let row = &mut o[r * d..(r + 1) * d];
        let part = &o_part[r * d..(r + 1) * d];
        if lp == f32::NEG_INFINITY {
            if *l == f32::NEG_INFINITY {
                row.fill(0.0);
            }
            continue;
        }
        if *l == f32::NEG_INFINITY {
            row.copy_from_slice(part);
            *l = lp;
            continue;
        }
        let m = l.max(lp);
        let (wa, wb) = ((*l - m).exp(), (lp - m).exp());
        let inv = 1.0 / (wa + wb);
        row.iter_mut().zip(part).for_each(|(x, &y)| *x = (wa * *x + wb * y) * inv);
        *l = m + (wa + wb).ln();
    }
    Ok(())
}

/// Combines any number of parts at once (the split-KV combine): `parts[k] = (o_k, lse_k)`, each with the
/// rows of `lse_out` (`o_out` has `d` values per row).
pub fn combine(parts: &[(&[f32], &[f32])], d: usize, o_out: &mut [f32], lse_out: &mut [f32]) -> Result<()> {
    check("o_out", o_out.len(), lse_out.len(), d)?;
    for (o, l) in parts {
        check("parts", o.len(), l.len(), d)?;
        if l.len() != lse_out.len() {
            return Err(Error::invalid("parts", format!("{} rows per part (as lse_out)", lse_out.len()), l.len()));
        }
    }
    for (r, lse) in lse_out.iter_mut().enumerate() {
        let row = &mut o_out[r * d..(r + 1) * d];
        row.fill(0.0);
        let m = parts.iter().map(|(_, l)| l[r]).fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            *lse = f32::NEG_INFINITY;
            continue;
        }
        let mut sum = 0f32;
        for (o, l) in parts {
            if l[r] == f32::NEG_INFINITY {
                continue;
            }
            let w = (l[r] - m).exp();
            sum += w;
            row.iter_mut().zip(&o[r * d..(r + 1) * d]).for_each(|(x, &y)| *x += w * y);
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
        *lse = m + sum.ln();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row softmax of explicit scores over a key subset: (o, lse), o = sum p_j v_j with scalar values.
    fn part(scores: &[f32], vals: &[f32], keys: &[usize]) -> (f32, f32) {
        if keys.is_empty() {
            return (0.0, f32::NEG_INFINITY);
        }
        let m = keys.iter().map(|&j| scores[j]).fold(f32::NEG_INFINITY, f32::max);
        let l: f32 = keys.iter().map(|&j| (scores[j] - m).exp()).sum();
        let o = keys.iter().map(|&j| (scores[j] - m).exp() * vals[j]).sum::<f32>() / l;
        (o, m + l.ln())
    }

    #[test]
    fn parts_merge_to_the_whole_row() {
        let scores = [0.3f32, -2.0, 5.5, 1.25, -0.75, 3.0];
        let vals = [1.0f32, -3.0, 0.5, 2.0, 4.0, -1.0];
        let all: Vec<usize> = (0..6).collect();
        let (o_ref, l_ref) = part(&scores, &vals, &all);
        let splits: [&[&[usize]]; 3] =
            [&[&[0, 1], &[2, 3, 4], &[5]], &[&[], &[0, 1, 2, 3, 4, 5]], &[&[2], &[], &[0, 1, 3, 4, 5]]];
        for split in splits {
            let ps: Vec<(f32, f32)> = split.iter().map(|k| part(&scores, &vals, k)).collect();
            let (mut o, mut l) = ([0f32], [f32::NEG_INFINITY]);
            for (po, pl) in &ps {
                merge_into(&mut o, &mut l, &[*po], &[*pl], 1).unwrap();
            }
            assert!((o[0] - o_ref).abs() < 1e-5 && (l[0] - l_ref).abs() < 1e-5, "{split:?}: {o:?} {l:?}");
            let owned: Vec<([f32; 1], [f32; 1])> = ps.iter().map(|&(a, b)| ([a], [b])).collect();
            let refs: Vec<(&[f32], &[f32])> = owned.iter().map(|(a, b)| (&a[..], &b[..])).collect();
            let (mut o2, mut l2) = ([7f32], [0f32]);
            combine(&refs, 1, &mut o2, &mut l2).unwrap();
            assert!((o2[0] - o_ref).abs() < 1e-5 && (l2[0] - l_ref).abs() < 1e-5);
        }
    }

    #[test]
    fn empty_rows_stay_zero_and_neg_inf() {
        let (mut o, mut l) = ([f32::NAN, f32::NAN], [f32::NEG_INFINITY]);
        merge_into(&mut o, &mut l, &[1.0, 2.0], &[f32::NEG_INFINITY], 2).unwrap();
        assert_eq!((o, l), ([0.0, 0.0], [f32::NEG_INFINITY]));
        let (mut o2, mut l2) = ([5f32, 5.0], [1f32]);
        combine(&[(&[1.0, 2.0], &[f32::NEG_INFINITY])], 2, &mut o2, &mut l2).unwrap();
        assert_eq!((o2, l2), ([0.0, 0.0], [f32::NEG_INFINITY]));
        // Huge log-sum-exps do not overflow.
        let (mut o3, mut l3) = ([1f32], [1000f32]);
        merge_into(&mut o3, &mut l3, &[3.0], &[1000.0], 1).unwrap();
        assert!((o3[0] - 2.0).abs() < 1e-6 && (l3[0] - (1000.0 + 2f32.ln())).abs() < 1e-3);
    }

    #[test]
    fn shapes_are_checked() {
        let (mut o, mut l) = ([0f32; 4], [0f32; 2]);
        assert_eq!(merge_into(&mut o, &mut l, &[0.0; 3], &[0.0; 2], 2).unwrap_err().arg(), Some("o_part"));
        assert_eq!(merge_into(&mut o, &mut l, &[0.0; 2], &[0.0; 1], 2).unwrap_err().arg(), Some("lse_part"));
        assert_eq!(merge_into(&mut o, &mut l, &[0.0; 4], &[0.0; 2], 3).unwrap_err().arg(), Some("o"));
        assert_eq!(combine(&[(&[0.0; 2], &[0.0; 1])], 2, &mut o, &mut l).unwrap_err().arg(), Some("parts"));
    }
}
