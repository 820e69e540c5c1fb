//! Workspace buffers of the CPU backend, kept between calls.
//!
//! A call's large scratch (the key/value panels, the backward's partial gradients, tiles and score caches) is
//! taken from a process-wide free list and given back when it is dropped. Repeated calls of one shape then
//! reuse memory that is already mapped: a fresh allocation of this size comes from the OS, and each first
//! touch of one of its pages is a page fault plus a kernel-side clear of the page, which costs more than the
//! `memset` that zeroes a reused buffer. At most [`KEEP_BYTES`] are kept; [`release`] gives them back to the
//! system allocator. Buffers below [`POOLED_BYTES`] are ordinary allocations (the allocator's heap reuses
//! those without new pages).

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Buffers of at least this many bytes go through the free lists.
const POOLED_BYTES: usize = 64 << 10;
/// The most bytes the free lists keep (a buffer given back beyond it is freed).
const KEEP_BYTES: usize = 256 << 20;

/// Buffers kept for reuse, and their total capacity in bytes.
pub(crate) struct FreeList<T> {
    bufs: Vec<Vec<T>>,
    bytes: usize,
}

impl<T> FreeList<T> {
    const fn new() -> Self {
        FreeList { bufs: Vec::new(), bytes: 0 }
    }
}

/// An element type with a free list of its own.
pub(crate) trait Item: Copy + Default + Send + 'static {
    fn free_list() -> &'static Mutex<FreeList<Self>>;
}

static F32: Mutex<FreeList<f32>> = Mutex::new(FreeList::new());
static U32: Mutex<FreeList<u32>> = Mutex::new(FreeList::new());

impl Item for f32 {
    fn free_list() -> &'static Mutex<FreeList<f32>> {
        &F32
    }
}

impl Item for u32 {
    fn free_list() -> &'static Mutex<FreeList<u32>> {
        &U32
    }
}

/// The free list of `T`, usable even if a thread panicked while holding it (its contents are plain buffers).
fn lock<T: Item>() -> std::sync::MutexGuard<'static, FreeList<T>> {
    T::free_list().lock().unwrap_or_else(|e| e.into_inner())
}

/// A zero-initialised buffer of `T` that returns its memory to the free list when dropped.
pub(crate) struct Buf<T: Item> {
    v: Vec<T>,
}

impl<T: Item> Buf<T> {
    /// `n` zeros: a kept buffer of at least `n` and at most `4n` elements (the smallest such) when there is
    /// one, else a new allocation.
    pub fn zeroed(n: usize) -> Self {
        let mut v = if n * std::mem::size_of::<T>() >= POOLED_BYTES { take::<T>(n) } else { None }.unwrap_or_default();
        v.clear();
        v.resize(n, T::default());
        Buf { v }
    }

    /// No elements (and no memory).
    pub fn empty() -> Self {
        Buf { v: Vec::new() }
    }

    /// Grows to `n` elements (new ones zero) if shorter; keeps the contents.
    pub fn grow(&mut self, n: usize) {
        if n > self.v.len() {
            if n > self.v.capacity() {
                let mut bigger = Buf::zeroed(n);
                bigger.v[..self.v.len()].copy_from_slice(&self.v);
                *self = bigger;
            } else {
                self.v.resize(n, T::default());
            }
        }
    }
}

/// The smallest kept buffer with room for `n` elements and at most `4n`, taken off the list.
fn take<T: Item>(n: usize) -> Option<Vec<T>> {
    let mut fl = lock::<T>();
    let (i, _) = fl
        .bufs
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= n && b.capacity() <= n.saturating_mul(4))
        .min_by_key(|(_, b)| b.capacity())?;
    let b = fl.bufs.swap_remove(i);
    fl.bytes -= b.capacity() * std::mem::size_of::<T>();
    Some(b)
}

impl<T: Item> Drop for Buf<T> {
    fn drop(&mut self) {
        let bytes = self.v.capacity() * std::mem::size_of::<T>();
        if bytes < POOLED_BYTES {
            return;
        }
        let mut fl = lock::<T>();
        if fl.bytes + bytes <= KEEP_BYTES {
            fl.bytes += bytes;
            fl.bufs.push(std::mem::take(&mut self.v));
        }
    }
}

impl<T: Item> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v
    }
}

impl<T: Item> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v
    }
}

/// Frees every buffer the CPU backend keeps between calls (up to [`KEEP_BYTES`]); later calls allocate
/// afresh.
pub fn release() {
    *lock::<f32>() = FreeList::new();
    *lock::<u32>() = FreeList::new();
}

/// Bytes the free list of `T` keeps now.
#[cfg(test)]
fn kept<T: Item>() -> usize {
    lock::<T>().bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An element type of the tests' own, so that other tests' attention calls (in parallel threads) do not
    /// touch the list this test checks.
    #[derive(Clone, Copy, Default, PartialEq, Debug)]
    struct T(u32);

    static TL: Mutex<FreeList<T>> = Mutex::new(FreeList::new());

    impl Item for T {
        fn free_list() -> &'static Mutex<FreeList<T>> {
            &TL
        }
    }

    #[test]
    fn buffers_are_reused_zeroed_and_bounded() {
        let n = 4 * POOLED_BYTES; // elements: 16x the threshold in bytes
        let mut a = Buf::<T>::zeroed(n);
        a.iter_mut().for_each(|x| *x = T(7));
        let ptr = a.as_ptr();
        drop(a);
        assert!(kept::<T>() >= n * 4);
        // Reused (same memory), shorter, zeroed.
        let b = Buf::<T>::zeroed(n / 2);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(kept::<T>(), 0);
        assert_eq!(b.len(), n / 2);
        assert!(b.iter().all(|&x| x == T(0)));
        // A request of less than a quarter of the kept buffer: a new allocation.
        drop(b);
        let c = Buf::<T>::zeroed(n / 8);
        assert_ne!(c.as_ptr(), ptr);
        drop(c);
        // Growing keeps the contents and zeroes the rest.
        let mut g = Buf::<T>::zeroed(3);
        g[2] = T(5);
        g.grow(2 * n);
        assert_eq!((g[2], g[3], g.len()), (T(5), T(0), 2 * n));
        drop(g);
        // Small buffers are not kept; the total stays within the bound.
        let before = kept::<T>();
        drop(Buf::<T>::zeroed(8));
        assert_eq!(kept::<T>(), before);
        let big: Vec<Buf<T>> = (0..3).map(|_| Buf::zeroed(KEEP_BYTES / 4 / 2)).collect();
        drop(big);
        assert!(kept::<T>() <= KEEP_BYTES);
        *lock::<T>() = FreeList::new();
        assert_eq!(kept::<T>(), 0);
    }
}
