//! A test network of its own: a bridge and one network namespace with a
//! veth per host, in a /24 of 198.18.0.0/15 (the benchmarking range, never
//! routed), for the fleet tests and the container suite. Names carry a
//! prefix per user and this process's pid, so suites running side by side
//! never meet. Everything is deleted on drop, panics included; after a
//! SIGKILL, `ip netns` and `ip link` show the leftovers by their prefix.

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};

/// Runs a command; its output, or an error naming it with its stderr.
pub fn run(args: &[&str]) -> Result<Output, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out)
}

/// [`run`], panicking on failure.
pub fn must(args: &[&str]) {
    if let Err(e) = run(args) {
        panic!("{e}");
    }
}

/// The bridge and one network namespace + veth per host.
#[derive(Debug)]
pub struct Net {
    pub bridge: String,
    /// 18 or 19: which half of 198.18.0.0/15.
    pub second_octet: u8,
    pub subnet: u8,
    pub namespaces: Vec<String>,
    pub veths: Vec<String>,
}

impl Net {
    /// The bridge's address: where the test's servers listen.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, self.second_octet, self.subnet, 1)
    }

    /// Host `i`'s address.
    pub fn address(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, self.second_octet, self.subnet, i as u8 + 2)
    }

    /// `n` hosts named `<prefix>-<pid>-<i>`, on `198.<second_octet>.x.0/24`.
    pub fn create(prefix: &str, second_octet: u8, n: usize) -> Net {
        assert!(n < 250, "one /24 per run");
        let pid = std::process::id();
        let mut net = Net {
            bridge: format!("{prefix}br{}", pid % 100_000),
            second_octet,
            subnet: (pid % 250) as u8 + 1,
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        let gw = format!("{}/24", net.gateway());
        must(&["ip", "link", "add", &net.bridge, "type", "bridge"]);
        must(&["ip", "addr", "add", &gw, "dev", &net.bridge]);
        must(&["ip", "link", "set", &net.bridge, "up"]);
        for i in 0..n {
            let ns = format!("{prefix}-{pid}-{i}");
            let vh = format!("{prefix}{}h{i}", pid % 10_000);
            must(&["ip", "netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            must(&[
                "ip", "link", "add", &vh, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            net.veths.push(vh.clone());
            must(&["ip", "link", "set", &vh, "master", &net.bridge, "up"]);
            let addr = format!("{}/24", net.address(i));
            must(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for v in &self.veths {
            let _ = run(&["ip", "link", "del", v]);
        }
        for ns in &self.namespaces {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
