//! Types shared by more than one podid binary: the pod record the plugin hands to tokend,
//! the plugin ↔ tokend wire answers, the shared defaults and file layout.
//!
//! Apart from [`fsutil`], whose one job is the atomic file write every part needs, the
//! library does no I/O.

pub mod defaults;
pub mod fsutil;
pub mod pod;
pub mod wire;

pub use pod::{BoundPod, PodKey, PodRecord, RecordError};
