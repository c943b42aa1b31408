//! The controller's metrics (prefix `podid_controller_`), with bounded label sets: no pod or
//! identity names as labels. The lease registers its own ([`crate::lease::LeaseMetrics`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `[(key, value); 2]`: the label sets are fixed pairs of static strings.
type Labels = [(&'static str, &'static str); 2];

/// What a reconcile was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Pod,
    Binding,
}

impl Subject {
    fn label(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Binding => "binding",
        }
    }
}

/// The objects the controller writes, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// Server-side apply of an assignment.
    AssignmentApply,
    /// Server-side apply of an assignment's `/status`.
    AssignmentStatus,
    AssignmentDelete,
    /// Merge patch of a pod's `/status` conditions.
    PodCondition,
    /// An Event on a pod or binding.
    Event,
}

impl Write {
    const ALL: [Write; 5] = [
        Self::AssignmentApply,
        Self::AssignmentStatus,
        Self::AssignmentDelete,
        Self::PodCondition,
        Self::Event,
    ];

    fn labels(self) -> Labels {
        let (kind, op) = match self {
            Self::AssignmentApply => ("assignment", "apply"),
            Self::AssignmentStatus => ("assignment_status", "apply"),
            Self::AssignmentDelete => ("assignment", "delete"),
            Self::PodCondition => ("pod_condition", "patch"),
            Self::Event => ("event", "create"),
        };
        [("kind", kind), ("op", op)]
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    reconciles: Family<Labels, Counter>,
    reconcile_seconds: Histogram,
    writes: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    watch_events: Family<Labels, Counter>,
    /// Managed assignments in the cache.
    pub assignments: Gauge,
    /// Pods waiting for a reconcile.
    pub queue_depth: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            writes: Family::default(),
            errors: Family::default(),
            watch_events: Family::default(),
            assignments: Gauge::default(),
            queue_depth: Gauge::default(),
        };
        registry.register(
            "reconciles",
            "Reconciles by subject (pod, binding) and result (ok, error)",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time of one pod reconcile, writes included",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "writes",
            "Successful API writes by kind and operation",
            m.writes.clone(),
        );
        registry.register(
            "errors",
            "Failed API calls by kind and operation (watch errors: kind=watch, op=<resource>)",
            m.errors.clone(),
        );
        registry.register(
            "watch_events",
            "Watch events applied to the index, by resource and type",
            m.watch_events.clone(),
        );
        registry.register(
            "assignments",
            "Managed AzureAssignedIdentity objects in the cache",
            m.assignments.clone(),
        );
        registry.register(
            "queue_depth",
            "Pods waiting for a reconcile (not counting those in progress)",
            m.queue_depth.clone(),
        );
        // every series exists from the start, at 0, so rates and "no writes" are observable
        for write in Write::ALL {
            drop(m.writes.get_or_create(&write.labels()));
            drop(m.errors.get_or_create(&write.labels()));
        }
        for subject in [Subject::Pod, Subject::Binding] {
            for result in ["ok", "error"] {
                drop(
                    m.reconciles
                        .get_or_create(&[("subject", subject.label()), ("result", result)]),
                );
            }
        }
        m
    }

    pub fn reconciled(&self, subject: Subject, ok: bool, seconds: Option<f64>) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&[("subject", subject.label()), ("result", result)])
            .inc();
        if let Some(seconds) = seconds {
            self.reconcile_seconds.observe(seconds);
        }
    }

    pub fn wrote(&self, write: Write) {
        self.writes.get_or_create(&write.labels()).inc();
    }

    pub fn write_failed(&self, write: Write) {
        self.errors.get_or_create(&write.labels()).inc();
    }

    /// A failed read (`op`: get) of `kind`.
    pub fn read_failed(&self, kind: &'static str) {
        self.errors
            .get_or_create(&[("kind", kind), ("op", "get")])
            .inc();
    }

    pub fn watch_failed(&self, resource: &'static str) {
        self.errors
            .get_or_create(&[("kind", "watch"), ("op", resource)])
            .inc();
    }

    pub fn watch_event(&self, resource: &'static str, kind: &'static str) {
        self.watch_events
            .get_or_create(&[("resource", resource), ("type", kind)])
            .inc();
    }
}
