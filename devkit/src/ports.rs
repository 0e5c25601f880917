//! Free loopback ports for processes a test (or the demo) starts.

/// A free loopback address whose port lies below the kernel's ephemeral
/// range. A port from `bind(0)`, released, may be taken by a later `bind(0)`
/// or outgoing connection (another test's app process, router, coordinator)
/// before the process it was meant for binds it; no kernel-chosen port
/// comes from below the ephemeral range.
pub fn stable_free_addr() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    // Within this process, successive calls walk a permutation of the range
    // (a step coprime with its size), so no port is handed out twice; the
    // start differs between processes.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static SEED: OnceLock<u32> = OnceLock::new();
    const SPAN: u32 = 12_000;
    const STEP: u32 = 7919;
    let low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    let first = low.saturating_sub(SPAN).max(1024);
    let span = (low - first).max(1);
    let seed = *SEED.get_or_init(|| {
        std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
    });
    for _ in 0..span {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = first + (seed % span + (k % span) * STEP) % span;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return l.local_addr().expect("local address").to_string();
        }
    }
    // The whole range is taken: fall back to a kernel-chosen port.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("local address").to_string()
}
