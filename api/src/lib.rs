//! Types shared by more than one podid binary: the pod record the plugin hands to tokend,
//! the plugin ↔ tokend wire answers, the shared defaults and file layout.
//!
//! Apart from [`fsutil`], whose one job is the atomic file write every part needs, the
//! library does no I/O.

#[cfg(feature = "crds")]
pub mod crd;
pub mod defaults;
pub mod fsutil;
#[cfg(feature = "crds")]
pub mod matching;
pub mod pod;
pub mod time;
pub mod wire;

pub use pod::{BoundPod, PodKey, PodRecord, RecordError};
