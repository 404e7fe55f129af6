//! Dequantization of every supported block type (the plain reference).
