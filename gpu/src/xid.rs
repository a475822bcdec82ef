//! XID classification, derived from NVIDIA's XID catalog ([`crate::xid_catalog`], every
//! code 1-172 with its Immediate resolution bucket): each class with the action an
//! operator or the collector should take.

use crate::xid_catalog::{self, Bucket};
use razar_shared::domain::{Severity, XidClass};

/// The class of an XID, from the catalog's immediate resolution bucket. Codes the
/// catalog does not list are `XidClass::Unknown`, never dropped.
pub fn classify(xid: u32) -> XidClass {
    let Some(entry) = xid_catalog::lookup(xid) else {
        return XidClass::Unknown;
    };
    match entry.immediate {
        Bucket::RestartApp => XidClass::RestartApplication,
        Bucket::Ignore => XidClass::Ignore,
        Bucket::WorkflowXid45 => XidClass::FollowsOtherError,
        Bucket::ResetGpu | Bucket::WorkflowXid48 => XidClass::ResetGpu,
        Bucket::WorkflowNvlinkErr | Bucket::WorkflowNvlink5Err => XidClass::NvLink,
        Bucket::RestartBm | Bucket::RestartVm => XidClass::RebootHost,
        Bucket::Xid154 => XidClass::FollowRecoveryAction,
        // Listed without a bucket: NVIDIA's default for those is to contact support.
        Bucket::ContactSupport
        | Bucket::CheckMechanicals
        | Bucket::CheckUvm
        | Bucket::UpdateSwfw
        | Bucket::Unspecified => XidClass::Report,
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
            (&[1, 2, 61, 162, 172], XidClass::Report),
            (&[144, 150], XidClass::NvLink),
            (&[0, 173, 999, 12345], XidClass::Unknown),
        ];
        for (xids, class) in table {
            for xid in *xids {
                assert_eq!(classify(*xid), *class, "xid {xid}");
            }
        }
        assert_eq!(classify(79).as_str(), "reboot_host");
        assert_eq!(classify(13), XidClass::RestartApplication);
        assert!(recommended_action(classify(79)).contains("reboot"));
        assert!(recommended_action(classify(48)).contains("reset"));
        assert_eq!(severity(classify(79)), Severity::Critical);
        assert_eq!(severity(classify(43)), Severity::Info);
    }
}

#[cfg(test)]
mod catalog_tests {
    use crate::xid_catalog::{bucket_name, lookup, Bucket, CATALOG};

    /// The table is complete and ordered: entry i is XID i + 1, every code 1-172.
    #[test]
    fn every_catalog_code_is_in_the_table_in_order() {
        assert_eq!(CATALOG.len(), 172);
        for (i, entry) in CATALOG.iter().enumerate() {
            assert_eq!(usize::try_from(entry.xid).ok(), Some(i + 1));
            assert!(!entry.mnemonic.is_empty(), "xid {}", entry.xid);
            assert_eq!(lookup(entry.xid), Some(entry));
        }
        assert_eq!(lookup(0), None);
        assert_eq!(lookup(173), None);
        assert_eq!(lookup(u32::MAX), None);
    }

    /// The catalog as data (`shared/data/xid-catalog.csv`) and the table agree row for row.
    #[test]
    fn table_matches_the_catalog_file() {
        let text = include_str!("../../shared/data/xid-catalog.csv");
        let mut rows = 0;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split(',').collect();
            let xid: u32 = fields[0].parse().expect("xid");
            let entry = lookup(xid).expect("listed");
            assert_eq!(entry.mnemonic, fields[1], "xid {xid}");
            let immediate = if fields[2].is_empty() {
                "NONE"
            } else {
                fields[2]
            };
            assert_eq!(entry.immediate.as_str(), immediate, "xid {xid}");
            assert_eq!(entry.investigatory, fields[3], "xid {xid}");
            rows += 1;
        }
        assert_eq!(rows, 172);
    }

    #[test]
    fn workflows_and_labels() {
        let w = |x| lookup(x).map(|e| e.immediate);
        assert_eq!(w(45), Some(Bucket::WorkflowXid45));
        assert_eq!(w(48), Some(Bucket::WorkflowXid48));
        assert_eq!(w(154), Some(Bucket::Xid154));
        assert_eq!(w(74), Some(Bucket::WorkflowNvlinkErr));
        assert_eq!(lookup(13).map(|e| e.investigatory), Some("WORKFLOW_XID_13"));
        assert_eq!(lookup(31).map(|e| e.investigatory), Some("WORKFLOW_XID_31"));
        assert_eq!(bucket_name(79), "RESTART_BM");
        assert_eq!(bucket_name(13), "RESTART_APP");
        assert_eq!(bucket_name(165), "NONE");
        assert_eq!(bucket_name(999), "UNKNOWN");
    }
}
