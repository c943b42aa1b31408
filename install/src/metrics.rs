//! The installer's metrics (prefix `podid_install_`), with fixed label sets.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Label = [(&'static str, &'static str); 1];

/// Where an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Binary,
    Conflist,
    Guard,
    Tokend,
    Taint,
}

impl Stage {
    const ALL: [Stage; 5] = [
        Self::Binary,
        Self::Conflist,
        Self::Guard,
        Self::Tokend,
        Self::Taint,
    ];

    fn label(self) -> Label {
        let stage = match self {
            Self::Binary => "binary",
            Self::Conflist => "conflist",
            Self::Guard => "guard",
            Self::Tokend => "tokend",
            Self::Taint => "taint",
        };
        [("stage", stage)]
    }
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Writes that put podid's entry (back) at the end of the primary.
    pub rechains: Counter,
    /// Lone `.conf` files converted into lists.
    pub conversions: Counter,
    /// Copies of the plugin binary into the bin dir.
    pub binary_installs: Counter,
    /// Installs of the guard table because it was missing or wrong.
    pub guard_repairs: Counter,
    /// Passes that found the first config truncated (being written) or changed under us.
    pub retries: Counter,
    errors: Family<Label, Counter>,
    /// 1 when `/readyz` answers 200.
    pub ready: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "rechains",
            "Writes of the primary conflist that put podid's entry (back) at its end",
            m.rechains.clone(),
        );
        registry.register(
            "conversions",
            "Lone .conf files converted into a .conflist",
            m.conversions.clone(),
        );
        registry.register(
            "binary_installs",
            "Copies of the podid binary into the CNI bin dir",
            m.binary_installs.clone(),
        );
        registry.register(
            "guard_repairs",
            "Installs of table ip podid-guard because it was missing or differed",
            m.guard_repairs.clone(),
        );
        registry.register(
            "retries",
            "Passes that found the first config truncated or changed under the installer's write",
            m.retries.clone(),
        );
        registry.register(
            "errors",
            "Failed passes by stage (binary, conflist, guard, tokend, taint)",
            m.errors.clone(),
        );
        registry.register(
            "ready",
            "1 when the node is ready (/readyz)",
            m.ready.clone(),
        );
        // every series exists from the start, at 0
        for stage in Stage::ALL {
            drop(m.errors.get_or_create(&stage.label()));
        }
        m
    }

    pub fn error(&self, stage: Stage) {
        self.errors.get_or_create(&stage.label()).inc();
    }
}
