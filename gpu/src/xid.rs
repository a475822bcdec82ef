//! XID classification after NVIDIA's XID catalog resolution buckets (as encoded in
//! NVIDIA/NVSentinel `xiderrorsmapping.csv`), each class with the action an operator
//! or the collector should take.

use razar_shared::domain::{Severity, XidClass};

/// The class of an XID. Unknown XIDs are `XidClass::Unknown`, never dropped.
pub fn classify(xid: u32) -> XidClass {
    match xid {
        13 | 31 | 94 => XidClass::RestartApplication,
        43 | 63 | 92 => XidClass::Ignore,
        45 => XidClass::FollowsOtherError,
        48 | 62 | 64 | 95 | 119 | 120 => XidClass::ResetGpu,
        61 => XidClass::Report,
        74 => XidClass::NvLink,
        79 => XidClass::RebootHost,
        154 => XidClass::FollowRecoveryAction,
        _ => XidClass::Unknown,
    }
}

/// What to do about an XID of this class, in the operator's words.
pub fn recommended_action(class: XidClass) -> &'static str {
    match class {
        XidClass::RestartApplication => "restart the application that caused it",
        XidClass::Ignore => "no action: informational",
        XidClass::FollowsOtherError => "act on the XID that preceded it",
        XidClass::ResetGpu => {
            "stop every process on the GPU, then reset it (nvidia-smi --gpu-reset -i N); \
             if it persists reboot, then replace the hardware"
        }
        XidClass::Report => "report to the operator and watch for recurrence",
        XidClass::NvLink => {
            "check the NVLink: stop the GPU's work and reset the GPU; replace on recurrence"
        }
        XidClass::RebootHost => "the GPU fell off the bus: drain the host and reboot it",
        XidClass::FollowRecoveryAction => {
            "follow the GPU recovery action reported with the linked XID"
        }
        XidClass::Unknown => "unknown XID: look it up in NVIDIA's XID catalog and report",
    }
}

/// How urgent an XID of this class is.
pub fn severity(class: XidClass) -> Severity {
    match class {
        XidClass::Ignore => Severity::Info,
        XidClass::RestartApplication
        | XidClass::FollowsOtherError
        | XidClass::Report
        | XidClass::Unknown => Severity::Warning,
        _ => Severity::Critical,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_buckets() {
        let table: &[(&[u32], XidClass)] = &[
            (&[13, 31, 94], XidClass::RestartApplication),
            (&[43, 63, 92], XidClass::Ignore),
            (&[45], XidClass::FollowsOtherError),
            (&[48, 62, 64, 95, 119, 120], XidClass::ResetGpu),
            (&[61], XidClass::Report),
            (&[74], XidClass::NvLink),
            (&[79], XidClass::RebootHost),
            (&[154], XidClass::FollowRecoveryAction),
            (&[0, 1, 999, 12345], XidClass::Unknown),
        ];
        for (xids, class) in table {
            for xid in *xids {
                assert_eq!(classify(*xid), *class, "xid {xid}");
            }
        }
        assert_eq!(classify(79).as_str(), "reboot_host");
        assert!(recommended_action(classify(79)).contains("reboot"));
        assert!(recommended_action(classify(48)).contains("reset"));
        assert_eq!(severity(classify(79)), Severity::Critical);
        assert_eq!(severity(classify(43)), Severity::Info);
    }
}
