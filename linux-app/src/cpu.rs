//! Where the guest's CPU time went while streaming (`/proc/stat`): the figure that says whether
//! the application's verification, the kernel's read path or waiting bounds the rate.

use std::fmt;

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    user: u64,
    system: u64,
    irq: u64,
    softirq: u64,
    idle: u64,
}

impl CpuTimes {
    /// Reads `/proc/stat`; `None` where it is missing or unreadable (no procfs mounted).
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq ...
        Some(CpuTimes {
            user: v.first()? + v.get(1)?,
            system: *v.get(2)?,
            idle: v.get(3)? + v.get(4)?,
            irq: *v.get(5)?,
            softirq: *v.get(6)?,
        })
    }

    /// The time from `earlier` to `self`.
    pub fn since(self, earlier: CpuTimes) -> CpuShare {
        CpuShare(CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            idle: self.idle.saturating_sub(earlier.idle),
        })
    }
}

/// CPU time over an interval, printed as shares.
pub struct CpuShare(CpuTimes);

impl CpuShare {
    /// The share of the interval the CPU was idle (idle and iowait), 0 to 1.
    pub fn idle_fraction(&self) -> f64 {
        let t = self.0;
        let total = t.user + t.system + t.irq + t.softirq + t.idle;
        if total == 0 {
            0.0
        } else {
            t.idle as f64 / total as f64
        }
    }
}

impl fmt::Display for CpuShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        let total = (t.user + t.system + t.irq + t.softirq + t.idle).max(1) as f64;
        let pct = |v: u64| 100.0 * v as f64 / total;
        write!(
            f,
            "user {:.0} %, system {:.0} %, irq {:.0} %, softirq {:.0} %, idle {:.0} %",
            pct(t.user),
            pct(t.system),
            pct(t.irq),
            pct(t.softirq),
            pct(t.idle)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_from_the_cpu_line() {
        let before =
            CpuTimes::parse("cpu  10 0 20 100 0 1 1 0 0 0\ncpu0 10 0 20 100 0 1 1 0 0 0\n")
                .expect("parsed");
        let after = CpuTimes::parse("cpu  60 10 30 120 0 6 6 0 0 0\n").expect("parsed");
        assert_eq!(
            after.since(before).to_string(),
            "user 60 %, system 10 %, irq 5 %, softirq 5 %, idle 20 %"
        );
        assert!((after.since(before).idle_fraction() - 0.2).abs() < 1e-12);
        assert_eq!(after.since(after).idle_fraction(), 0.0);
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None);
    }
}
