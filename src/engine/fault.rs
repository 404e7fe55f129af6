//! Fault injection for tests and demonstrations (cargo feature `fault-injection`).
//!
//! `ZOE_FAULT=<kind>@step:<N>[,times:<K>]` makes an engine fail at the `N`th forward step of an
//! incarnation (counted from 1 after its warm-up), in the first `K` incarnations (default 1):
//! - `panic`: the engine thread panics;
//! - `error`: the step reports a fatal backend error;
//! - `hang`: the engine thread stops stepping (sleeps for good).
//!
//! Without the feature the spec is still parsed (so `check-config`-style errors are the same), but
//! no engine ever consults it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Panic,
    Error,
    Hang,
}

#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub step: u64,
    pub times: u32,
    /// Incarnations it has fired in (shared by every incarnation of one model).
    fired: Arc<AtomicU32>,
}

impl PartialEq for Fault {
    fn eq(&self, o: &Self) -> bool {
        (self.kind, self.step, self.times) == (o.kind, o.step, o.times)
    }
}

impl Fault {
    pub fn new(kind: FaultKind, step: u64, times: u32) -> Self {
        Self { kind, step, times, fired: Arc::new(AtomicU32::new(0)) }
    }

    pub fn parse(spec: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("ZOE_FAULT = {spec:?}: {why}; expected <panic|error|hang>@step:<N>[,times:<K>] with N, K ≥ 1")
        };
        let (kind, rest) = spec.split_once('@').ok_or_else(|| bad("no '@'"))?;
        let kind = match kind.trim() {
            "panic" => FaultKind::Panic,
            "error" => FaultKind::Error,
            "hang" => FaultKind::Hang,
            other => return Err(bad(&format!("unknown kind {other:?}"))),
        };
        let (mut step, mut times) = (None, 1u32);
        for part in rest.split(',') {
            let (key, value) = part.split_once(':').ok_or_else(|| bad(&format!("{part:?} is not key:value")))?;
            let n: u64 = value.trim().parse().map_err(|_| bad(&format!("{value:?} is not a number")))?;
            if n == 0 {
                return Err(bad(&format!("{key} is 0")));
            }
            match key.trim() {
                "step" => step = Some(n),
                "times" => times = u32::try_from(n).map_err(|_| bad("times is too large"))?,
                other => return Err(bad(&format!("unknown key {other:?}"))),
            }
        }
        Ok(Self::new(kind, step.ok_or_else(|| bad("no step"))?, times))
    }

    /// `ZOE_FAULT` if set (an invalid spec is an error).
    pub fn from_env() -> Result<Option<Self>, String> {
        match std::env::var("ZOE_FAULT") {
            Ok(s) if !s.trim().is_empty() => Self::parse(&s).map(Some),
            _ => Ok(None),
        }
    }

    /// Called at every forward step of an incarnation (`step` counts from 1): acts when it is
    /// this fault's step and it has fired in fewer than `times` incarnations.
    pub fn at_step(&self, step: u64) -> Result<(), String> {
        if step != self.step {
            return Ok(());
        }
        let fired = self.fired.fetch_add(1, Ordering::SeqCst);
        if fired >= self.times {
            return Ok(());
        }
        match self.kind {
            FaultKind::Panic => panic!("injected fault: panic at step {step}"),
            FaultKind::Error => Err(format!("injected fault: backend error at step {step}")),
            FaultKind::Hang => {
                tracing::warn!(step, "injected fault: the engine hangs");
                loop {
                    std::thread::park();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let f = Fault::parse("panic@step:3").unwrap();
        assert_eq!((f.kind, f.step, f.times), (FaultKind::Panic, 3, 1));
        let f = Fault::parse("hang@step:1,times:4").unwrap();
        assert_eq!((f.kind, f.step, f.times), (FaultKind::Hang, 1, 4));
        for bad in ["panic", "boom@step:1", "panic@step:0", "panic@step:x", "panic@times:2", "error@step:1,when:2"] {
            let e = Fault::parse(bad).unwrap_err();
            assert!(e.contains("ZOE_FAULT") && e.contains("expected"), "{bad}: {e}");
        }
    }

    #[test]
    fn fires_at_its_step_in_the_first_k_incarnations() {
        let f = Fault::new(FaultKind::Error, 2, 2);
        assert!(f.at_step(1).is_ok());
        assert!(f.at_step(2).unwrap_err().contains("step 2"));
        assert!(f.at_step(2).is_err(), "second incarnation");
        assert!(f.at_step(2).is_ok(), "fired twice: done");
        let p = Fault::new(FaultKind::Panic, 1, 1);
        assert!(std::panic::catch_unwind(|| p.at_step(1)).is_err());
        assert!(p.at_step(1).is_ok());
    }
}
