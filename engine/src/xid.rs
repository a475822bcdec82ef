//! XID classification from NVIDIA's catalog ([`razar_shared::xid_catalog`]) and the
//! decoding of XID 154's recovery action. Pure functions; the workflows that look at
//! history live in the engine's rules (see the crate docs).

use razar_shared::xid_catalog::{self, Bucket};
use serde::{Deserialize, Serialize};

/// What the catalog's immediate bucket asks for, before any history is considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum XidPlan {
    /// RESTART_APP: an application fault unless history says hardware (13, 31, 94...).
    Application,
    /// RESET_GPU: hardware, ladder from a GPU reset.
    ResetGpu,
    /// RESTART_BM / RESTART_VM: hardware, ladder from a host reboot.
    RebootHost,
    /// CONTACT_SUPPORT, CHECK_MECHANICALS, CHECK_UVM, UPDATE_SWFW: for a person.
    Report,
    /// IGNORE: recorded, nothing done.
    Ignore,
    /// WORKFLOW_XID_45.
    Xid45,
    /// WORKFLOW_XID_48.
    Xid48,
    /// WORKFLOW_NVLINK_ERR / WORKFLOW_NVLINK5_ERR: drain and reset.
    NvLink,
    /// XID_154: the recovery action in the message.
    RecoveryAction,
    /// Not in the catalog, or no bucket given.
    Unknown,
}

/// Classifies a code by its immediate bucket.
pub fn plan(xid: u32) -> XidPlan {
    let Some(entry) = xid_catalog::lookup(xid) else {
        return XidPlan::Unknown;
    };
    match entry.immediate {
        Bucket::RestartApp => XidPlan::Application,
        Bucket::ResetGpu => XidPlan::ResetGpu,
        Bucket::RestartBm | Bucket::RestartVm => XidPlan::RebootHost,
        Bucket::ContactSupport
        | Bucket::CheckMechanicals
        | Bucket::CheckUvm
        | Bucket::UpdateSwfw => XidPlan::Report,
        Bucket::Ignore => XidPlan::Ignore,
        Bucket::WorkflowXid45 => XidPlan::Xid45,
        Bucket::WorkflowXid48 => XidPlan::Xid48,
        Bucket::WorkflowNvlinkErr | Bucket::WorkflowNvlink5Err => XidPlan::NvLink,
        Bucket::Xid154 => XidPlan::RecoveryAction,
        Bucket::Unspecified => XidPlan::Unknown,
    }
}

/// NVML's GPU recovery actions (XID 154 messages: "GPU recovery action changed from
/// 0x0 (None) to 0x1 (GPU Reset Required)").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryAction {
    None,
    GpuReset,
    NodeReboot,
    DrainP2p,
    DrainAndReset,
}

/// The action XID 154 changed *to*, from its message; `None` when the message does not
/// say (the caller escalates rather than guess).
pub fn parse_recovery_action(message: &str) -> Option<RecoveryAction> {
    // The action after the last " to " wins ("changed from X to Y").
    let lower = message.to_ascii_lowercase();
    let target = lower.rsplit_once(" to ").map_or(lower.as_str(), |(_, t)| t);
    if let Some(code) = target.trim_start().strip_prefix("0x") {
        let digits: String = code.chars().take_while(char::is_ascii_hexdigit).collect();
        match u32::from_str_radix(&digits, 16).ok() {
            Some(0) => return Some(RecoveryAction::None),
            Some(1) => return Some(RecoveryAction::GpuReset),
            Some(2) => return Some(RecoveryAction::NodeReboot),
            Some(3) => return Some(RecoveryAction::DrainP2p),
            Some(4) => return Some(RecoveryAction::DrainAndReset),
            _ => {}
        }
    }
    // Names, most specific first ("drain and reset" contains "reset").
    let names = [
        ("drain and reset", RecoveryAction::DrainAndReset),
        ("drain p2p", RecoveryAction::DrainP2p),
        ("node reboot", RecoveryAction::NodeReboot),
        ("reboot", RecoveryAction::NodeReboot),
        ("gpu reset", RecoveryAction::GpuReset),
        ("reset", RecoveryAction::GpuReset),
        ("none", RecoveryAction::None),
    ];
    names
        .iter()
        .find(|(name, _)| target.contains(name))
        .map(|(_, action)| *action)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalog_code_has_a_plan_and_unknown_codes_are_unknown() {
        for entry in xid_catalog::CATALOG.iter() {
            let _ = plan(entry.xid);
        }
        assert_eq!(plan(0), XidPlan::Unknown);
        assert_eq!(plan(173), XidPlan::Unknown);
        assert_eq!(plan(u32::MAX), XidPlan::Unknown);
        assert_eq!(plan(13), XidPlan::Application);
        assert_eq!(plan(31), XidPlan::Application);
        assert_eq!(plan(45), XidPlan::Xid45);
        assert_eq!(plan(48), XidPlan::Xid48);
        assert_eq!(plan(63), XidPlan::Ignore);
        assert_eq!(plan(64), XidPlan::ResetGpu);
        assert_eq!(plan(74), XidPlan::NvLink);
        assert_eq!(plan(79), XidPlan::RebootHost);
        assert_eq!(plan(144), XidPlan::NvLink);
        assert_eq!(plan(154), XidPlan::RecoveryAction);
        assert_eq!(plan(172), XidPlan::Unknown);
    }

    #[test]
    fn recovery_action_from_message() {
        let cases = [
            (
                "GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)",
                Some(RecoveryAction::GpuReset),
            ),
            (
                "GPU recovery action changed from 0x1 (GPU Reset Required) to 0x2 (Node Reboot Required)",
                Some(RecoveryAction::NodeReboot),
            ),
            (
                "recovery action changed from 0x0 (None) to 0x4 (Drain and Reset)",
                Some(RecoveryAction::DrainAndReset),
            ),
            ("changed to Drain P2P", Some(RecoveryAction::DrainP2p)),
            (
                "GPU recovery action changed from 0x2 (Node Reboot Required) to 0x0 (None)",
                Some(RecoveryAction::None),
            ),
            ("something else entirely", None),
            ("", None),
        ];
        for (message, want) in cases {
            assert_eq!(parse_recovery_action(message), want, "{message}");
        }
    }
}
