//! Maps keyed by a `&'static str`'s address instead of its text, for per-call lookups of
//! statements and operation names: hashing an address costs a multiplication, hashing a
//! statement's text hundreds of instructions on every call. Two copies of one literal at two
//! addresses are two keys, which costs one more entry, never a wrong answer.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `&'static str` compared by address and length.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StaticKey(pub(crate) &'static str);

impl PartialEq for StaticKey {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for StaticKey {}

impl std::hash::Hash for StaticKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_usize(self.0.as_ptr() as usize ^ self.0.len().rotate_left(48));
    }
}

/// Fibonacci hashing of the one word a [`StaticKey`] writes.
#[derive(Debug, Default)]
pub(crate) struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u8(*b);
        }
    }

    fn write_u8(&mut self, b: u8) {
        self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        // hashbrown takes its control bits from the top and its index from the bottom.
        self.0 ^ (self.0 >> 29)
    }
}

/// A map keyed by [`StaticKey`].
pub(crate) type StaticMap<V> = HashMap<StaticKey, V, BuildHasherDefault<AddressHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_addresses_not_texts() {
        static A: &str = "SELECT 1";
        let b: &'static str = Box::leak(String::from("SELECT 1").into_boxed_str());
        let mut map: StaticMap<u32> = StaticMap::default();
        map.insert(StaticKey(A), 1);
        map.insert(StaticKey(b), 2);
        assert_eq!(map.len(), 2);
        assert_eq!(map.get(&StaticKey(A)), Some(&1));
        assert_eq!(map.get(&StaticKey(b)), Some(&2));
        // A prefix at the same address is another key.
        assert_eq!(map.get(&StaticKey(&A[..6])), None);
    }
}
