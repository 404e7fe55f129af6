//! The KV-cache seam. A model asks the cache where new tokens go (slots) and which slots hold a
//! sequence's positions; it never assumes a layout. `ContiguousKvCache` (one sequence, position
//! p in slot p) is what the CLI needs; the paged block cache of the engine-core issue implements
//! the same trait with slots computed from block tables.

use crate::backend::{Backend, BackendError};

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("context full: {have} tokens cached + {add} new exceed the context length {capacity}")]
    ContextFull { have: usize, add: usize, capacity: usize },
    #[error("KV cache out of blocks: {need} more needed, {available} free")]
    OutOfBlocks { need: usize, available: usize },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub trait KvCache<B: Backend>: KvLayers<B> {
    /// Tokens cached so far (the position of the next token).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn capacity(&self) -> usize;
    /// Reserves slots for `n` new tokens; returns them (positions `len..len+n`).
    fn append(&mut self, n: usize) -> Result<Vec<u32>, KvError>;
    /// Slots of positions `0..len` in order.
    fn slots(&self) -> &[u32];
}

/// Where a forward pass finds each layer's K/V storage: any [`KvCache`], or a whole paged pool
/// when several sequences run in one forward.
pub trait KvLayers<B: Backend> {
    /// K and V storage of one layer.
    fn kv_layer(&mut self, layer: usize) -> (&mut B::KvLayer, &mut B::KvLayer);
}

/// One sequence, position p in slot p, capacity fixed at creation.
pub struct ContiguousKvCache<B: Backend> {
    layers: Vec<(B::KvLayer, B::KvLayer)>,
    slots: Vec<u32>,
    capacity: usize,
}

impl<B: Backend> ContiguousKvCache<B> {
    pub fn new(backend: &B, n_layers: usize, kv_cols: usize, capacity: usize) -> Result<Self, KvError> {
        let layers = (0..n_layers)
            .map(|_| Ok((backend.kv_layer(capacity, kv_cols)?, backend.kv_layer(capacity, kv_cols)?)))
            .collect::<Result<_, BackendError>>()?;
        Ok(Self { layers, slots: Vec::with_capacity(capacity), capacity })
    }
}

impl<B: Backend> KvCache<B> for ContiguousKvCache<B> {
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn append(&mut self, n: usize) -> Result<Vec<u32>, KvError> {
        let have = self.slots.len();
        if have + n > self.capacity {
            return Err(KvError::ContextFull { have, add: n, capacity: self.capacity });
        }
        let new: Vec<u32> = (have as u32..(have + n) as u32).collect();
        self.slots.extend_from_slice(&new);
        Ok(new)
    }

    fn slots(&self) -> &[u32] {
        &self.slots
    }
}

impl<B: Backend> KvLayers<B> for ContiguousKvCache<B> {
    fn kv_layer(&mut self, layer: usize) -> (&mut B::KvLayer, &mut B::KvLayer) {
        let (k, v) = &mut self.layers[layer];
        (k, v)
    }
}
