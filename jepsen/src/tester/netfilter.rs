//! Network partitions with iptables: one rule per cut direction of a link
//! (`-s A -d B -j DROP`), all in a dedicated chain that INPUT jumps to, so healing is one
//! flush and nothing outside the chain is touched. The chain is flushed when the tester
//! starts (a crashed earlier run may have left rules) and removed when it ends.
//!
//! Dropping on INPUT rather than OUTPUT makes a cut link silent, as a real partition is:
//! the sender gets no error, its packets just never arrive.

use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};

/// The tester's own chain.
pub const CHAIN: &str = "SPHEREDB-JEPSEN";
/// Built-in chain that jumps to [`CHAIN`].
const PARENT_CHAIN: &str = "INPUT";
/// Most copies of the jump rule removed at exit (a crashed run may have added one).
const MAX_JUMP_RULES_REMOVED: usize = 16;

/// Why partitions cannot be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetfilterError {
    #[error(
        "the partition nemesis needs root (iptables changes the firewall); run as root, or \
         choose --nemesis without partitions"
    )]
    NotRoot,
    #[error(
        "the partition nemesis needs iptables, which is missing or not working ({detail}); \
         install the Debian package `iptables` (apt-get install iptables)"
    )]
    Missing { detail: String },
    #[error("iptables {args}: {detail}")]
    Command { args: String, detail: String },
}

fn iptables(args: &[&str]) -> Result<Output, NetfilterError> {
    // -w waits for the xtables lock instead of failing when another tool holds it.
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetfilterError::Missing {
            detail: e.to_string(),
        })
}

fn run(args: &[&str]) -> Result<(), NetfilterError> {
    let output = iptables(args)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NetfilterError::Command {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Whether partitions can be made here: root, and a working iptables.
pub fn check_available() -> Result<(), NetfilterError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(NetfilterError::NotRoot);
    }
    let output = iptables(&["-L", PARENT_CHAIN, "-n"])?;
    if !output.status.success() {
        return Err(NetfilterError::Missing {
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The installed chain. Dropping it removes every rule the tester added.
#[derive(Debug)]
pub struct Netfilter {
    _private: (),
}

impl Netfilter {
    /// Creates (or empties) the chain and hooks it into INPUT.
    pub fn install() -> Result<Netfilter, NetfilterError> {
        check_available()?;
        // -N fails when the chain exists (left by a killed run): then just flush it.
        let _ = run(&["-N", CHAIN]);
        run(&["-F", CHAIN])?;
        if run(&["-C", PARENT_CHAIN, "-j", CHAIN]).is_err() {
            run(&["-I", PARENT_CHAIN, "1", "-j", CHAIN])?;
        }
        Ok(Netfilter { _private: () })
    }

    /// Drops packets from `from` to `to`, both ways.
    pub fn cut(&self, a: Ipv4Addr, b: Ipv4Addr) -> Result<(), NetfilterError> {
        let (a, b) = (a.to_string(), b.to_string());
        run(&["-A", CHAIN, "-s", &a, "-d", &b, "-j", "DROP"])?;
        run(&["-A", CHAIN, "-s", &b, "-d", &a, "-j", "DROP"])
    }

    /// Removes every cut.
    pub fn heal(&self) -> Result<(), NetfilterError> {
        run(&["-F", CHAIN])
    }
}

impl Drop for Netfilter {
    fn drop(&mut self) {
        let _ = run(&["-F", CHAIN]);
        for _ in 0..MAX_JUMP_RULES_REMOVED {
            if run(&["-D", PARENT_CHAIN, "-j", CHAIN]).is_err() {
                break;
            }
        }
        let _ = run(&["-X", CHAIN]);
    }
}
