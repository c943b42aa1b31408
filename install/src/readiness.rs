//! What the node is waiting for: the plugin binary, the chained primary, the guard, the taint.
//! Published on a `watch` channel that the keepers write and `/readyz` and the taint task read.

use std::fmt;

/// One condition of readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Done,
    /// Not yet, and why.
    Pending(String),
}

impl Check {
    pub fn is_done(&self) -> bool {
        *self == Self::Done
    }
}

/// Which condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Binary,
    Chained,
    Guard,
    Taint,
}

/// The four conditions of `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub binary: Check,
    pub chained: Check,
    pub guard: Check,
    pub taint: Check,
}

impl Default for Readiness {
    fn default() -> Self {
        let starting = || Check::Pending("starting".to_owned());
        Self {
            binary: starting(),
            chained: starting(),
            guard: starting(),
            taint: starting(),
        }
    }
}

impl Readiness {
    /// The node may take pods: plugin installed, chained, guard in place, taint handled.
    pub fn ready(&self) -> bool {
        self.binary.is_done()
            && self.chained.is_done()
            && self.guard.is_done()
            && self.taint.is_done()
    }

    pub fn slot(&mut self, component: Component) -> &mut Check {
        match component {
            Component::Binary => &mut self.binary,
            Component::Chained => &mut self.chained,
            Component::Guard => &mut self.guard,
            Component::Taint => &mut self.taint,
        }
    }

    /// Everything but the taint, which waits for these (and for tokend).
    pub fn protected(&self) -> bool {
        self.binary.is_done() && self.chained.is_done() && self.guard.is_done()
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, check) in [
            ("binary", &self.binary),
            ("chained", &self.chained),
            ("guard", &self.guard),
            ("taint", &self.taint),
        ] {
            match check {
                Check::Done => writeln!(f, "{name}: ok")?,
                Check::Pending(why) => writeln!(f, "{name}: {why}")?,
            }
        }
        Ok(())
    }
}
