//! `--attribute vm`: the rows of a recording, charged in the kernel either
//! to a time window or to an attribution token (a libvirtd call that could
//! start a VM, or a process working for one), moved to the windows of the
//! VMs the tokens turned out to be for, and the rest to the unattributed
//! window of its time window.

use std::{cell::Cell, collections::HashMap};

use profiler_common::record::is_attributed;

use super::{LossCount, Profile};
use crate::windows::{Attribution, UNATTRIBUTED};

/// Attributes `profile`'s rows (a profile recorded with `--attribute vm`
/// whose rows are not attributed yet; any other is left as it is):
///
/// - a token carried by a VM creation is that VM's (the first VM it
///   created): its rows go to the VM's window, or nowhere if the VM is
///   outside every window;
/// - a call's token that created no VM is unattributed, in the time window
///   the call began in;
/// - a time window's rows are unattributed.
///
/// The windows become [`crate::windows::WindowSpec::attributed_windows`].
pub fn resolve(profile: &mut Profile) {
    if profile.meta.attribute != Attribution::Vm || profile.windows.iter().any(|w| w.unattributed) {
        return;
    }
    let Some(spec) = profile.meta.window_spec.clone() else {
        return;
    };
    let mut vm_of: HashMap<u32, u64> = HashMap::new();
    let mut vms: Vec<_> = profile.vms.iter().collect();
    vms.sort_by_key(|v| v.ordinal);
    for v in vms {
        if let Some(t) = v.token {
            vm_of.entry(t).or_insert(v.ordinal);
        }
    }
    let call_window: HashMap<u32, Option<u32>> =
        profile.calls.iter().map(|c| (c.token, c.window)).collect();
    let unknown = Cell::new(0u64);
    super::merge::map_windows(profile, &|w| {
        if !is_attributed(w) {
            return Some(w | UNATTRIBUTED);
        }
        if let Some(&ordinal) = vm_of.get(&w) {
            return spec.window_of(ordinal);
        }
        if let Some(window) = call_window.get(&w) {
            window.map(|t| t | UNATTRIBUTED)
        } else {
            unknown.set(unknown.get() + 1);
            None
        }
    });
    if unknown.get() > 0 {
        profile.losses.push(LossCount {
            window: None,
            kind: "rows of work for a VM or call whose start was not seen (not attributed)"
                .to_owned(),
            count: unknown.get(),
        });
    }
    profile.windows = spec.attributed_windows(profile.vms.len() as u64);
    profile.calls.clear();
    for v in &mut profile.vms {
        v.token = None;
    }
}

#[cfg(test)]
mod tests {
    use profiler_common::record::ATTRIBUTED;

    use super::*;
    use crate::{
        profile::{CallToken, CgroupOp, Meta, VmCreation},
        windows::WindowSpec,
    };

    fn vm(ordinal: u64, token: Option<u32>) -> VmCreation {
        VmCreation {
            ordinal,
            time_ns: ordinal * 100,
            pid: 100 + u32::try_from(ordinal).unwrap(),
            tid: 100 + u32::try_from(ordinal).unwrap(),
            comm: "qemu".into(),
            source: "kvm".into(),
            cmdline: None,
            name: None,
            token,
        }
    }

    fn op(window: u32, count: u64) -> CgroupOp {
        CgroupOp {
            window,
            tgid: 1,
            comm: "libvirtd".into(),
            op: "mkdir".into(),
            hierarchy: "v2".into(),
            path: "/machine".into(),
            count,
            timed: 0,
            total_ns: 0,
            max_ns: 0,
        }
    }

    #[test]
    fn tokens_go_to_the_vms_they_started_and_the_rest_is_unattributed() {
        let t = |n: u32| ATTRIBUTED | n;
        let mut p = Profile {
            meta: Meta {
                attribute: Attribution::Vm,
                window_spec: Some(WindowSpec::Every { size: 2 }),
                ..Meta::default()
            },
            // VM 1 by call 7's QEMU, VM 2 by a QEMU of its own (token 9),
            // VM 3 by call 8's; call 5 started nothing.
            vms: vec![vm(1, Some(t(7))), vm(2, Some(t(9))), vm(3, Some(t(8)))],
            calls: [(5, Some(1)), (7, Some(0)), (8, Some(1))]
                .map(|(n, window)| CallToken {
                    token: t(n),
                    window,
                    procedure: 10,
                    time_ns: 0,
                })
                .to_vec(),
            cgroups: vec![
                op(t(7), 12),
                op(t(9), 1),
                op(t(8), 12),
                op(t(5), 2),
                op(1, 3),
                op(0, 4),
                op(t(6), 1),
            ],
            ..Profile::default()
        };
        resolve(&mut p);
        let by_window: Vec<(u32, u64)> = p.cgroups.iter().map(|c| (c.window, c.count)).collect();
        // Window 1 holds VMs 1 and 2 (12 + 1), window 2 VM 3; call 5 and
        // the unattributed rows of time window 1 together, the setup's
        // apart; token 6, never announced, is a loss.
        assert_eq!(
            by_window,
            [(1, 13), (2, 12), (UNATTRIBUTED, 4), (UNATTRIBUTED | 1, 5)]
        );
        assert_eq!(p.losses.len(), 1);
        assert!(p.losses[0].kind.contains("not attributed"));
        let ids: Vec<u32> = p.windows.iter().map(|w| w.id).collect();
        assert_eq!(
            ids,
            [1, 2, UNATTRIBUTED, UNATTRIBUTED | 1, UNATTRIBUTED | 2]
        );
        assert!(p.calls.is_empty() && p.vms.iter().all(|v| v.token.is_none()));
        // Once attributed, a profile is left as it is.
        let before = p.clone();
        resolve(&mut p);
        assert_eq!(p, before);
    }
}
