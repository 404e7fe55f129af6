//! The paged KV cache: one pool of fixed-size blocks shared by every sequence of a model, a block
//! table per sequence, reference counts, and prefix caching by chained block hashes (vLLM's
//! design, written for this engine).
//!
//! - Slots: block `b` holds slots `b·block_size .. (b+1)·block_size` of every layer's K/V storage.
//!   A sequence's position `p` lives in slot `table[p / block_size]·block_size + p % block_size`,
//!   so the model's attention, which reads K/V through slots ([`KvCache::slots`]), works on paged
//!   storage unchanged.
//! - Prefix caching: when a block fills, its hash — of the previous block's hash and its own
//!   tokens, so equal hashes mean equal whole prefixes — is recorded. A new sequence whose prompt
//!   starts with hashed blocks takes them (reference count + 1) and computes only the rest. Only
//!   full blocks are shared and a full block is never written again, so sharing needs no copy.
//! - Freeing: a block whose count drops to 0 stays cached (its hash still findable) until the
//!   pool needs it; cached blocks are reused least recently freed first. Free-list blocks come
//!   before cached ones.
//! - Admission: [`BlockPool::can_allocate`] says whether `n` more blocks exist before anything
//!   is taken, so a scheduler can wait or preempt instead of failing half-way.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use super::kv_cache::{KvCache, KvError, KvLayers};
use crate::backend::{Backend, BackendError};

/// Default tokens per block (vLLM's default).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Block bookkeeping, independent of where K/V live (unit-testable without a backend).
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    refs: Vec<u32>,
    /// Hash of a full block's prefix, for blocks registered for prefix caching.
    hash: Vec<Option<u64>>,
    by_hash: HashMap<u64, u32>,
    /// Never-used or unhashed freed blocks.
    free: Vec<u32>,
    /// Freed blocks that still hold a cached prefix, least recently freed first.
    cached: VecDeque<u32>,
    /// Prefix-cache statistics: blocks asked for and blocks found.
    pub queries: u64,
    pub hits: u64,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be at least 1");
        Self {
            block_size,
            refs: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            by_hash: HashMap::new(),
            // Popped from the end: block 0 first.
            free: (0..num_blocks as u32).rev().collect(),
            cached: VecDeque::new(),
            queries: 0,
            hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be handed out now (free or cached-but-unreferenced).
    pub fn available(&self) -> usize {
        self.free.len() + self.cached.len()
    }

    /// Fraction of blocks referenced by a sequence (vLLM's `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.refs.is_empty() {
            return 0.0;
        }
        (self.num_blocks() - self.available()) as f64 / self.num_blocks() as f64
    }

    pub fn can_allocate(&self, blocks: usize) -> bool {
        blocks <= self.available()
    }

    /// One block for new tokens, or `None` when the pool is exhausted. A cached block that is
    /// reused loses its prefix hash.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.cached.pop_front()?;
                if let Some(h) = self.hash[b as usize].take() {
                    if self.by_hash.get(&h) == Some(&b) {
                        self.by_hash.remove(&h);
                    }
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Drops one reference; at zero the block becomes reusable (kept cached if it is hashed).
    pub fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than taken");
        *r = r.saturating_sub(1);
        if *r == 0 {
            if self.hash[b as usize].is_some() {
                self.cached.push_back(b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// Records that full block `b` holds the prefix with chained hash `h` (first writer wins).
    pub fn register(&mut self, b: u32, h: u64) {
        if self.hash[b as usize].is_none() && !self.by_hash.contains_key(&h) {
            self.hash[b as usize] = Some(h);
            self.by_hash.insert(h, b);
        }
    }

    /// The cached blocks holding the longest prefix of `hashes`, each taken (reference + 1).
    pub fn take_prefix(&mut self, hashes: &[u64]) -> Vec<u32> {
        let mut out = Vec::new();
        self.queries += hashes.len() as u64;
        for h in hashes {
            let Some(&b) = self.by_hash.get(h) else { break };
            self.hits += 1;
            if self.refs[b as usize] == 0 {
                // Back from the cached list.
                if let Some(i) = self.cached.iter().position(|&c| c == b) {
                    self.cached.remove(i);
                }
            }
            self.refs[b as usize] += 1;
            out.push(b);
        }
        out
    }
}

/// Chained hashes of the full blocks of `tokens`.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    chain_hashes(0, tokens, block_size)
}

/// Chained hashes of the full blocks of `tokens`, continuing from `prev` (the hash of the block
/// before them; 0 at the start of a sequence).
fn chain_hashes(mut prev: u64, tokens: &[u32], block_size: usize) -> Vec<u64> {
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            prev.hash(&mut h);
            block.hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

/// One sequence's view of the pool: its block table, its tokens (for hashing) and the slots of
/// its positions.
#[derive(Debug, Default, Clone)]
pub struct Sequence {
    blocks: Vec<u32>,
    slots: Vec<u32>,
    tokens: Vec<u32>,
    /// Full blocks already registered for prefix caching.
    registered: usize,
    /// Hash of the last registered block (0 before the first), so new blocks hash on from it.
    last_hash: u64,
    /// Positions this sequence may hold at most (its context length).
    max_len: usize,
}

impl Sequence {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Slots of positions `0..len`.
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

impl<B: Backend> KvLayers<B> for PagedKvCache<B> {
    fn kv_layer(&mut self, layer: usize) -> (&mut B::KvLayer, &mut B::KvLayer) {
        let (k, v) = &mut self.layers[layer];
        (k, v)
    }
}

/// K/V storage for `num_blocks · block_size` slots per layer, and the pool that hands them out.
pub struct PagedKvCache<B: Backend> {
    layers: Vec<(B::KvLayer, B::KvLayer)>,
    pub pool: BlockPool,
}

impl<B: Backend> PagedKvCache<B> {
    pub fn new(
        backend: &B,
        n_layers: usize,
        kv_cols: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, BackendError> {
        let slots = num_blocks * block_size;
        let layers = (0..n_layers)
            .map(|_| Ok((backend.kv_layer(slots, kv_cols)?, backend.kv_layer(slots, kv_cols)?)))
            .collect::<Result<_, BackendError>>()?;
        Ok(Self { layers, pool: BlockPool::new(num_blocks, block_size) })
    }

    /// A new sequence for `prompt`, reusing cached blocks for the longest hashed prefix. At least
    /// one prompt token is always left to compute (its logits are needed), so a prompt that is
    /// entirely cached gives back its last block. Returns the sequence and how many prompt
    /// tokens are already in the cache.
    pub fn start(&mut self, prompt: &[u32], max_len: usize) -> (Sequence, usize) {
        let bs = self.pool.block_size;
        let mut hashes = block_hashes(prompt, bs);
        if hashes.len() * bs == prompt.len() {
            hashes.pop();
        }
        let blocks = self.pool.take_prefix(&hashes);
        let cached = blocks.len() * bs;
        let slots = blocks.iter().flat_map(|&b| (0..bs as u32).map(move |i| b * bs as u32 + i)).collect();
        let last_hash = blocks.len().checked_sub(1).map_or(0, |i| hashes[i]);
        let seq =
            Sequence { registered: blocks.len(), last_hash, blocks, slots, tokens: prompt[..cached].to_vec(), max_len };
        (seq, cached)
    }

    /// Blocks `seq` needs to grow by `n` tokens.
    pub fn blocks_needed(&self, seq: &Sequence, n: usize) -> usize {
        let bs = self.pool.block_size;
        (seq.len() + n).div_ceil(bs).saturating_sub(seq.blocks.len())
    }

    /// Returns every block of `seq` to the pool (hashed ones stay cached for later prefixes).
    pub fn free(&mut self, seq: &mut Sequence) {
        for b in seq.blocks.drain(..) {
            self.pool.release(b);
        }
        seq.slots.clear();
        seq.tokens.clear();
        seq.registered = 0;
        seq.last_hash = 0;
    }

    /// `KvCache` for `seq`'s next forward over `tokens` (the ids, for prefix hashing).
    pub fn view<'a>(&'a mut self, seq: &'a mut Sequence, tokens: &'a [u32]) -> SeqView<'a, B> {
        SeqView { cache: self, seq, tokens }
    }
}

/// A [`KvCache`] over one sequence of a [`PagedKvCache`]. `append` takes blocks from the pool as
/// positions cross block boundaries and registers each block that fills.
pub struct SeqView<'a, B: Backend> {
    cache: &'a mut PagedKvCache<B>,
    seq: &'a mut Sequence,
    tokens: &'a [u32],
}

impl<B: Backend> KvCache<B> for SeqView<'_, B> {
    fn len(&self) -> usize {
        self.seq.len()
    }

    fn capacity(&self) -> usize {
        self.seq.max_len
    }

    fn append(&mut self, n: usize) -> Result<Vec<u32>, KvError> {
        let have = self.seq.len();
        if have + n > self.seq.max_len {
            return Err(KvError::ContextFull { have, add: n, capacity: self.seq.max_len });
        }
        let need = self.cache.blocks_needed(self.seq, n);
        if !self.cache.pool.can_allocate(need) {
            return Err(KvError::OutOfBlocks { need, available: self.cache.pool.available() });
        }
        for _ in 0..need {
            let b = self.cache.pool.allocate().expect("can_allocate checked");
            self.seq.blocks.push(b);
        }
        let bs = self.cache.pool.block_size;
        let new: Vec<u32> = (have..have + n).map(|p| self.seq.blocks[p / bs] * bs as u32 + (p % bs) as u32).collect();
        self.seq.slots.extend_from_slice(&new);
        self.seq.tokens.extend_from_slice(&self.tokens[..n.min(self.tokens.len())]);
        // Register blocks that are now full (their K/V are written by this forward before any
        // other sequence can look them up: lookups happen between forwards).
        let full = self.seq.tokens.len() / bs;
        if full > self.seq.registered {
            let seq = &mut *self.seq;
            let fresh = &seq.tokens[seq.registered * bs..full * bs];
            for (i, h) in chain_hashes(seq.last_hash, fresh, bs).into_iter().enumerate() {
                self.cache.pool.register(seq.blocks[seq.registered + i], h);
                seq.last_hash = h;
            }
            seq.registered = full;
        }
        Ok(new)
    }

    fn slots(&self) -> &[u32] {
        &self.seq.slots
    }
}

impl<B: Backend> KvLayers<B> for SeqView<'_, B> {
    fn kv_layer(&mut self, layer: usize) -> (&mut B::KvLayer, &mut B::KvLayer) {
        self.cache.kv_layer(layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::model::kv_cache::ContiguousKvCache;
    use crate::model::llama::Llama;
    use crate::model::test_model;

    #[test]
    fn pool_allocates_releases_and_caches_hashed_blocks() {
        let mut p = BlockPool::new(3, 4);
        assert!(p.can_allocate(3) && !p.can_allocate(4));
        let (a, b, c) = (p.allocate().unwrap(), p.allocate().unwrap(), p.allocate().unwrap());
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(p.allocate(), None);
        assert!((p.usage() - 1.0).abs() < 1e-9);
        p.register(a, 11);
        p.release(a);
        p.release(b);
        assert_eq!(p.available(), 2);
        // The unhashed block is reused before the cached one.
        assert_eq!(p.allocate(), Some(b));
        // The cached block is still findable...
        assert_eq!(p.take_prefix(&[11, 12]), vec![a]);
        assert_eq!((p.queries, p.hits), (2, 1));
        p.release(a);
        // ...until the pool needs it: reuse drops its hash.
        assert_eq!(p.allocate(), Some(a));
        assert_eq!(p.take_prefix(&[11]), Vec::<u32>::new());
    }

    #[test]
    fn chained_hashes_depend_on_the_whole_prefix() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6, 7], 2);
        assert_eq!(a.len(), 3);
        let b = block_hashes(&[9, 2, 3, 4], 2);
        assert_ne!(a[1], b[1], "same block, different prefix");
        assert_eq!(block_hashes(&[1, 2, 3, 4], 2), a[..2]);
    }

    /// `n` greedy tokens after `prompt`, with `forward` running the model on the next tokens.
    fn greedy(mut forward: impl FnMut(&[u32]) -> Vec<f32>, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        let mut logits = forward(prompt);
        for _ in 0..n {
            let id = (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32;
            out.push(id);
            logits = forward(&[id]);
        }
        out
    }

    /// Greedy decoding over the paged cache (block size 4: every step crosses or fills blocks)
    /// equals the contiguous cache, and a second sequence with the same prompt reuses the full
    /// prompt blocks and still decodes the same tokens.
    #[test]
    fn paged_decoding_equals_contiguous_and_prefix_hits_change_nothing() {
        let file = test_model::gguf(3);
        let be = CpuBackend::new(1);
        let model = Llama::from_gguf(&file, &be).unwrap();
        let prompt: Vec<u32> = (10..31).collect(); // 21 tokens: 5 full blocks of 4 + 1
        let cols = model.layout().kv_cols();

        let mut contiguous = ContiguousKvCache::new(&be, test_model::LAYERS, cols, 64).unwrap();
        let want = greedy(|t| model.forward(&be, t, &mut contiguous, false).unwrap(), &prompt, 12);

        let mut paged = PagedKvCache::new(&be, test_model::LAYERS, cols, 32, 4).unwrap();
        let run = |paged: &mut PagedKvCache<CpuBackend>| {
            let (mut seq, cached) = paged.start(&prompt, 64);
            let got =
                greedy(|t| model.forward(&be, t, &mut paged.view(&mut seq, t), false).unwrap(), &prompt[cached..], 12);
            paged.free(&mut seq);
            (got, cached)
        };
        let (first, cached1) = run(&mut paged);
        assert_eq!(first, want);
        assert_eq!(cached1, 0);
        assert_eq!(paged.pool.available(), 32, "free returns every block");
        let (second, cached2) = run(&mut paged);
        assert_eq!(second, want, "prefix-cached blocks hold the same K/V");
        assert_eq!(cached2, 20, "the 5 full prompt blocks were reused");
        assert!(paged.pool.hits >= 5);
    }

    fn argmax(logits: &[f32]) -> u32 {
        (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32
    }

    /// A prompt whose placeholder rows carry other embeddings, fed to the paged cache in two
    /// chunks, decodes like the prompt of the tokens those embeddings belong to; and the same
    /// placeholders for different "images" never share prefix-cached blocks, while the same image
    /// again does.
    #[test]
    fn image_rows_in_chunks_decode_like_their_tokens_and_key_the_prefix_cache() {
        use crate::model::llama::MmPrompt;
        let file = test_model::gguf(5);
        let be = CpuBackend::with_precision(1, crate::backend::cpu::Precision::F32);
        let model = Llama::from_gguf(&file, &be).unwrap();
        let cols = model.layout().kv_cols();
        let h = model.config.hidden_size;
        let embed = |ids: &[u32]| model.token_embeddings(&be, ids);
        assert_eq!(embed(&[1]).len(), h);
        let real: Vec<u32> = (10..22).collect();
        let mut c = ContiguousKvCache::new(&be, test_model::LAYERS, cols, 64).unwrap();
        let want = greedy(|t| model.forward(&be, t, &mut c, false).unwrap(), &real, 6);
        // Rows 3..11 are "an image": placeholder id 5, the real tokens' embeddings.
        let mut prompt = real.clone();
        prompt[3..11].fill(5);
        let image = |salt: u32, rows: &[u32]| MmPrompt {
            embed_rows: (3..11).collect(),
            embeds: embed(rows),
            key_ids: prompt
                .iter()
                .enumerate()
                .map(|(i, &t)| if (3..11).contains(&i) { 1 << 31 | salt } else { t })
                .collect(),
            ..MmPrompt::default()
        };
        let mut paged = PagedKvCache::new(&be, test_model::LAYERS, cols, 64, 4).unwrap();
        let mut run = |mm: &MmPrompt| {
            let (mut seq, cached) = paged.start(&mm.keys(0, &prompt), 64);
            let mut out = Vec::new();
            let mut next = prompt[cached..].to_vec();
            if next.len() > 5 {
                // The prompt in two chunks, the first ending inside the image.
                model.forward_batch_mm(&be, &mut paged, &mut [(&next[..5], &mut seq)], &[Some(mm)]).unwrap();
                next.drain(..5);
            }
            for _ in 0..6 {
                let l = model.forward_batch_mm(&be, &mut paged, &mut [(&next[..], &mut seq)], &[Some(mm)]).unwrap();
                let id = argmax(&l[0]);
                out.push(id);
                next = vec![id];
            }
            paged.free(&mut seq);
            (out, cached)
        };
        let a = image(1, &real[3..11]);
        assert_eq!(run(&a), (want.clone(), 0));
        assert_eq!(run(&a), (want, 8), "the same image again reuses its blocks");
        let other: Vec<u32> = (50..58).collect();
        let (_, cached) = run(&image(2, &other));
        assert_eq!(cached, 0, "another image behind the same placeholders shares nothing past them");
    }

    /// Several sequences in one forward: prompts of different lengths prefilled together, a
    /// sequence joining while others decode, a prompt fed in two chunks — each decodes exactly
    /// what it decodes alone.
    #[test]
    fn batched_forward_equals_each_sequence_alone() {
        let file = test_model::gguf(5);
        let be = CpuBackend::new(2);
        let model = Llama::from_gguf(&file, &be).unwrap();
        let cols = model.layout().kv_cols();
        let prompts: [Vec<u32>; 3] = [(10..17).collect(), (40..61).collect(), (70..73).collect()];
        let steps = 10;
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut c = ContiguousKvCache::new(&be, test_model::LAYERS, cols, 64).unwrap();
                greedy(|t| model.forward(&be, t, &mut c, false).unwrap(), p, steps)
            })
            .collect();

        let mut paged = PagedKvCache::new(&be, test_model::LAYERS, cols, 64, 4).unwrap();
        let mut seqs: Vec<Sequence> = prompts.iter().map(|p| paged.start(p, 64).0).collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); 3];
        // Step 0: sequence 0 whole prompt, sequence 1 the first 9 prompt tokens; sequence 2 waits.
        // Step 1: sequence 0 decodes, sequence 1 the rest of its prompt, sequence 2 its prompt.
        // Later steps: everyone decodes.
        let mut next: Vec<Vec<u32>> = vec![prompts[0].clone(), prompts[1][..9].to_vec(), Vec::new()];
        for step in 0..=steps + 1 {
            if step == 1 {
                next[1] = prompts[1][9..].to_vec();
                next[2] = prompts[2].clone();
            }
            let active: Vec<usize> = (0..3).filter(|&i| !next[i].is_empty() && out[i].len() < steps).collect();
            if active.is_empty() {
                break;
            }
            let toks: Vec<Vec<u32>> = active.iter().map(|&i| next[i].clone()).collect();
            let mut batch: Vec<(&[u32], &mut Sequence)> = Vec::new();
            let mut rest: &mut [Sequence] = &mut seqs;
            let mut taken = 0;
            for (k, &i) in active.iter().enumerate() {
                let (_, tail) = rest.split_at_mut(i - taken);
                let (one, tail) = tail.split_first_mut().unwrap();
                batch.push((&toks[k], one));
                rest = tail;
                taken = i + 1;
            }
            let logits = model.forward_batch(&be, &mut paged, &mut batch).unwrap();
            for (k, &i) in active.iter().enumerate() {
                // Sequence 1's first chunk ends mid-prompt: its logits are not a prediction.
                if step == 0 && i == 1 {
                    next[1].clear();
                    continue;
                }
                let id = argmax(&logits[k]);
                out[i].push(id);
                next[i] = vec![id];
            }
        }
        assert_eq!(out, alone);
        for s in &mut seqs {
            paged.free(s);
        }
        assert_eq!(paged.pool.available(), 64);
    }

    #[test]
    fn appending_past_the_pool_is_an_error_not_a_panic() {
        let be = CpuBackend::new(1);
        let mut paged = PagedKvCache::new(&be, 1, 8, 2, 4).unwrap();
        let (mut seq, _) = paged.start(&[1, 2, 3], 100);
        let tokens: Vec<u32> = (0..12).collect();
        let mut view = paged.view(&mut seq, &tokens);
        assert_eq!(view.append(8).unwrap().len(), 8);
        let e = view.append(1).unwrap_err();
        assert!(matches!(e, KvError::OutOfBlocks { need: 1, available: 0 }), "{e}");
        let (mut small, _) = paged.start(&[], 3);
        let e = paged.view(&mut small, &tokens).append(4).unwrap_err();
        assert!(matches!(e, KvError::ContextFull { .. }));
    }
}
