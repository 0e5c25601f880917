//! Free loopback ports for processes a test (or the demo) starts.

/// A free loopback address whose port lies below the kernel's ephemeral
/// range (`cutover_shared::net::free_loopback_port`): a port from
/// `bind(0)`, released, may be taken by another test's outgoing connection
/// before the process it was meant for binds it.
pub fn stable_free_addr() -> String {
    let port = cutover_shared::net::free_loopback_port().expect("binding a free loopback port");
    format!("127.0.0.1:{port}")
}
