//! Bootstrapping negatives: image weakening, error injection, BPO records and preference pairs.
