//! The vision tower's output for recently seen images, so that a conversation that sends the
//! same picture again (Ollama and OpenAI clients resend every image with every turn) does not
//! run the tower again: on a Jetson a camera frame's tower run is a large share of the time to
//! the first token. Entries are keyed by the image file's SHA-256 and its patch grid (the grid
//! follows from the pixel budget, which a request may change); the cache belongs to one model,
//! whose preprocessing constants fix the rest. Least recently used entries go first, within a
//! byte budget.

use std::collections::VecDeque;
use std::sync::Arc;

/// An image as the tower saw it: the file's SHA-256 and `grid_thw`.
pub type ImageKey = ([u8; 32], [usize; 3]);

/// Tower outputs (`[tokens, out_hidden]` f32 each) by [`ImageKey`], least recently used first.
#[derive(Debug)]
pub struct EmbedCache {
    budget: usize,
    used: usize,
    entries: VecDeque<(ImageKey, Arc<[f32]>)>,
    hits: u64,
    misses: u64,
}

impl EmbedCache {
    /// A cache that holds at most `budget_bytes` of embeddings (0 disables it).
    pub fn new(budget_bytes: usize) -> Self {
        Self { budget: budget_bytes, used: 0, entries: VecDeque::new(), hits: 0, misses: 0 }
    }

    /// The embeddings of `key`, now the most recently used, or `None`; counted as a hit or a miss.
    pub fn get(&mut self, key: &ImageKey) -> Option<Arc<[f32]>> {
        let v = self.peek(key);
        match v {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        v
    }

    /// [`Self::get`] without counting (the request path looks before decoding an image; the
    /// tower's bookkeeping counts the image once, with [`Self::record_hit`] when it was found).
    pub fn peek(&mut self, key: &ImageKey) -> Option<Arc<[f32]>> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        let entry = self.entries.remove(i).expect("found above");
        let v = entry.1.clone();
        self.entries.push_back(entry);
        Some(v)
    }

    /// Counts a hit found earlier by [`Self::peek`].
    pub fn record_hit(&mut self) {
        self.hits += 1;
    }

    /// Keeps `embeds` for `key`, evicting the least recently used entries to stay within the
    /// budget; an entry larger than the whole budget is not kept.
    pub fn insert(&mut self, key: ImageKey, embeds: Arc<[f32]>) {
        let bytes = std::mem::size_of_val(&*embeds);
        if bytes > self.budget {
            return;
        }
        if let Some(i) = self.entries.iter().position(|(k, _)| *k == key) {
            let (_, old) = self.entries.remove(i).expect("found above");
            self.used -= std::mem::size_of_val(&*old);
        }
        while self.used + bytes > self.budget {
            let (_, old) = self.entries.pop_front().expect("used > 0 means an entry");
            self.used -= std::mem::size_of_val(&*old);
        }
        self.used += bytes;
        self.entries.push_back((key, embeds));
    }

    /// Bytes held, entries, hits and misses so far.
    pub fn stats(&self) -> (usize, usize, u64, u64) {
        (self.used, self.entries.len(), self.hits, self.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ImageKey {
        ([n; 32], [1, 2, 2])
    }

    fn v(len: usize, x: f32) -> Arc<[f32]> {
        vec![x; len].into()
    }

    #[test]
    fn least_recently_used_goes_first_within_the_budget() {
        let mut c = EmbedCache::new(3 * 4 * 10); // three 10-float entries
        c.insert(key(1), v(10, 1.0));
        c.insert(key(2), v(10, 2.0));
        c.insert(key(3), v(10, 3.0));
        assert_eq!(c.get(&key(1)).unwrap()[0], 1.0); // 1 is now the most recent
        c.insert(key(4), v(10, 4.0)); // evicts 2
        assert!(c.get(&key(2)).is_none());
        assert_eq!(c.get(&key(3)).unwrap()[0], 3.0);
        assert_eq!(c.get(&key(4)).unwrap()[0], 4.0);
        assert_eq!(c.get(&key(1)).unwrap()[0], 1.0);
        assert_eq!(c.stats(), (120, 3, 4, 1));

        // A 20-float entry evicts the two least recently used (3 and 4).
        c.insert(key(5), v(20, 5.0));
        assert_eq!(c.stats().0, 120);
        assert!(c.get(&key(3)).is_none() && c.get(&key(4)).is_none());
        assert!(c.get(&key(1)).is_some() && c.get(&key(5)).is_some());
    }

    #[test]
    fn the_grid_is_part_of_the_key_and_reinserting_replaces() {
        let mut c = EmbedCache::new(1000);
        c.insert(key(1), v(10, 1.0));
        let other_grid = ([1; 32], [1, 4, 4]);
        assert!(c.get(&other_grid).is_none());
        c.insert(key(1), v(20, 2.0));
        assert_eq!(c.stats().0, 80);
        assert_eq!(c.get(&key(1)).unwrap().len(), 20);
    }

    #[test]
    fn too_large_or_disabled_is_not_kept() {
        let mut c = EmbedCache::new(40);
        c.insert(key(1), v(11, 1.0));
        assert!(c.get(&key(1)).is_none());
        let mut off = EmbedCache::new(0);
        off.insert(key(1), v(1, 1.0));
        assert_eq!(off.stats(), (0, 0, 0, 0));
    }
}
