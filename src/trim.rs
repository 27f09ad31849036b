//! Giving memory back after a wave of connections has gone. The allocator
//! does most of it: jemalloc (the global allocator, see `src/main.rs`)
//! returns pages unused for 0.2 s to the system from a background
//! thread. What it cannot return is memory still held: so the maps that
//! grow with the connections (the hubs' sessions, users and rooms, the
//! brokers' registries, presence and subscriptions) shrink once mostly
//! empty, with [`shrink_map`].

/// Shrinks a map that has emptied to under a quarter of its capacity (to
/// twice its length), so a wave of connections that has gone leaves no
/// table sized for it; amortized, it costs nothing per removal.
pub fn shrink_map<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut std::collections::HashMap<K, V, S>,
) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_mostly_empty_map_shrinks_and_a_full_one_does_not() {
        let mut map: HashMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        let full = map.capacity();
        shrink_map(&mut map);
        assert_eq!(map.capacity(), full);
        map.retain(|k, _| *k < 100);
        shrink_map(&mut map);
        assert!(map.capacity() < full / 10, "{} of {full}", map.capacity());
        assert_eq!(map.len(), 100);
    }
}
