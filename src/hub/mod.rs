//! Model manifests, the models directory, pull.
