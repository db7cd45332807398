//! `process_*` series, the names every Prometheus client exports (client_golang's set), read
//! by `metrics-process` when a scrape asks for them rather than on a timer: a value is as
//! fresh as the scrape, and an unscraped proxy reads nothing. Registered on the proxy's own
//! recorder like every other series (two proxies in one test process each show the process).

use metrics::{Counter, Gauge};

use super::Reg;

/// Handles for the process series, set from one `/proc/self` reading per scrape.
pub struct ProcessMetrics {
    cpu_seconds: Counter,
    open_fds: Gauge,
    max_fds: Gauge,
    resident: Gauge,
    virtual_bytes: Gauge,
    threads: Gauge,
    start_time: Gauge,
}

impl ProcessMetrics {
    pub(super) fn new(r: &Reg) -> ProcessMetrics {
        ProcessMetrics {
            // A Prometheus counter is whole: the CPU time is counted in whole seconds.
            cpu_seconds: r.counter(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                &[],
            ),
            open_fds: r.gauge("process_open_fds", "Number of open file descriptors.", &[]),
            max_fds: r.gauge("process_max_fds", "Maximum number of open file descriptors (RLIMIT_NOFILE).", &[]),
            resident: r.gauge("process_resident_memory_bytes", "Resident memory size in bytes.", &[]),
            virtual_bytes: r.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", &[]),
            threads: r.gauge("process_threads", "Number of OS threads in the process.", &[]),
            start_time: r.gauge(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds.",
                &[],
            ),
        }
    }

    /// Reads the process's state now. A value the platform does not give is left as it was.
    pub fn refresh(&self) {
        let m = metrics_process::collector::collect();
        if let Some(v) = m.cpu_seconds_total {
            self.cpu_seconds.absolute(v as u64);
        }
        let gauges = [
            (&self.open_fds, m.open_fds),
            (&self.max_fds, m.max_fds),
            (&self.resident, m.resident_memory_bytes),
            (&self.virtual_bytes, m.virtual_memory_bytes),
            (&self.threads, m.threads),
            (&self.start_time, m.start_time_seconds),
        ];
        for (gauge, value) in gauges {
            if let Some(v) = value {
                gauge.set(v as f64);
            }
        }
    }
}
