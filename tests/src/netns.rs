//! Regions as network namespaces: each coordinator, and each region's
//! agent, gets its own namespace (`ip netns`, as root) with one address on
//! a bridge in the root namespace, so processes talk over a real network
//! stack instead of loopback, and a test can cut links between them.
//!
//! Partitions drop traffic with nftables inside the namespaces (a table
//! `inet cutover_faults` per namespace, matching only the other
//! namespaces' addresses), so they can be symmetric, one-way or flapping,
//! and healing is deleting the table. The bridge itself has an address
//! too: the test process, in the root namespace, reaches every namespace
//! whatever the partition, the way an operator outside the regions would.
//!
//! Each namespace resolves the others by name (`/etc/netns/<ns>/hosts`,
//! which `ip netns exec` mounts over `/etc/hosts`), so certificates that
//! name `coordinator-N` verify as they do in production DNS.
//!
//! Dropping a [`Net`] deletes its namespaces, bridge and hosts files, on
//! failure too; kill the processes inside first (their handles are
//! dropped before the `Net` when declared after it).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// nftables table the faults live in, in each namespace.
const TABLE: &str = "cutover_faults";

/// Namespaces on one bridge.
pub struct Net {
    /// Short and unique per `Net` in this machine: interface names are at
    /// most 15 bytes.
    tag: String,
    bridge: String,
    /// The bridge's own address, in the root namespace.
    gateway: Ipv4Addr,
    /// Name → (namespace, address).
    spaces: BTreeMap<String, (String, Ipv4Addr)>,
}

/// Runs a system tool (`ip`, `nft`, `mount`, ...) and fails with its
/// stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (run scripts/setup, which installs it; run as root)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Net {
    /// A namespace per name, each with `lo` up and one address on a new
    /// bridge; every namespace's hosts file names them all.
    pub fn new(names: &[&str]) -> Result<Net> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:03x}{:x}", pid % 4096, n % 16);
        // 10.<200..249>.<0..255>.0/24: from the pid and the counter, so
        // nets of concurrent tests (and test binaries) do not overlap.
        let subnet = (200 + (pid % 50) as u8, ((pid / 50 + n * 7) % 256) as u8);
        let mut net = Net {
            bridge: format!("cvb{tag}"),
            gateway: Ipv4Addr::new(10, subnet.0, subnet.1, 1),
            tag,
            spaces: BTreeMap::new(),
        };
        run("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        let gateway = format!("{}/24", net.gateway);
        run("ip", &["addr", "add", &gateway, "dev", &net.bridge])?;
        run("ip", &["link", "set", &net.bridge, "up"])?;
        for (i, name) in names.iter().enumerate() {
            let ns = format!("cv{}-{name}", net.tag);
            let addr = Ipv4Addr::new(10, subnet.0, subnet.1, 10 + i as u8);
            net.spaces.insert(name.to_string(), (ns.clone(), addr));
            run("ip", &["netns", "add", &ns])?;
            let (outer, inner) = (format!("cv{}{i}a", net.tag), format!("cv{}{i}b", net.tag));
            run("ip", &["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
            run("ip", &["link", "set", &outer, "master", &net.bridge])?;
            run("ip", &["link", "set", &outer, "up"])?;
            run("ip", &["link", "set", &inner, "netns", &ns])?;
            run("ip", &["-n", &ns, "link", "set", &inner, "name", "eth0"])?;
            run("ip", &["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for (name, (_, addr)) in &net.spaces {
            hosts.push_str(&format!("{addr} {name}\n"));
        }
        for (ns, _) in net.spaces.values() {
            let dir = std::path::Path::new("/etc/netns").join(ns);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("hosts"), &hosts)?;
        }
        Ok(net)
    }

    /// The address of namespace `name`.
    pub fn addr(&self, name: &str) -> Ipv4Addr {
        self.spaces[name].1
    }

    /// The bridge's address: the root namespace (the test process) as the
    /// namespaces see it.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The names of the namespaces.
    pub fn names(&self) -> Vec<String> {
        self.spaces.keys().cloned().collect()
    }

    /// Loads nftables `rules` in namespace `name` (through a file named
    /// after `label`).
    pub fn nft(&self, name: &str, label: &str, rules: &str) -> Result<()> {
        let path = std::env::temp_dir().join(format!("cutover-nft-{}-{label}.nft", self.tag));
        std::fs::write(&path, rules)?;
        let r = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.spaces[name].0,
                "nft",
                "-f",
                &path.display().to_string(),
            ],
        );
        let _ = std::fs::remove_file(&path);
        r
    }

    /// A command that runs `program` inside namespace `name`.
    pub fn command(&self, name: &str, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.spaces[name].0]).arg(program);
        c
    }

    /// Drops all traffic between the namespaces of `a` and those of `b`,
    /// both ways, on top of the faults already set.
    pub fn partition(&self, a: &[&str], b: &[&str]) -> Result<()> {
        for (from, to) in [(a, b), (b, a)] {
            for x in from {
                self.drop_between(x, to)?;
            }
        }
        Ok(())
    }

    /// Drops traffic from `from` to each of `to` and back in `from`'s
    /// namespace: what it sends there is lost, and what comes from there
    /// is not accepted.
    pub fn drop_between(&self, from: &str, to: &[&str]) -> Result<()> {
        let addrs: Vec<String> = to.iter().map(|t| self.addr(t).to_string()).collect();
        let set = addrs.join(", ");
        let rules = format!(
            "table inet {TABLE} {{\n\
             chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n\
             chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n\
             }}\n"
        );
        self.nft(from, from, &rules)
    }

    /// Removes every fault.
    pub fn heal(&self) -> Result<()> {
        for (ns, _) in self.spaces.values() {
            // A namespace without faults has no table: nothing to delete.
            let _ = run("ip", &["netns", "exec", ns, "nft", "delete", "table", "inet", TABLE]);
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (ns, _) in self.spaces.values() {
            let _ = run("ip", &["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(ns));
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}
