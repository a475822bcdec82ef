//! NVIDIA's XID catalog as data: every code 1-172 with its mnemonic and its two
//! resolution buckets (Immediate and Investigatory action), exactly as the catalog writes
//! them. Generated from `shared/data/xid-catalog.csv` (NVIDIA's `Xid-Catalog.xlsx`, last
//! modified 2025-09-30; gpud's generated catalog of 2025-10-29 agrees on every code).
//! Decisions record [`CATALOG_REVISION`] so a rule can be replayed against the catalog it
//! used. Codes outside the table are "unknown", never dropped.

/// The catalog revision this table follows (recorded with every decision).
pub const CATALOG_REVISION: &str = "nvidia-xid-catalog/2025-09-30/sha256:7f70ce96";

/// NVIDIA's "Resolution Bucket (Immediate Action)".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// Restart the application.
    RestartApp,
    /// Reset the GPU.
    ResetGpu,
    /// Restart the bare-metal host.
    RestartBm,
    /// Restart the virtual machine.
    RestartVm,
    /// Contact NVIDIA support.
    ContactSupport,
    /// No action.
    Ignore,
    /// Check fans, cooling and mechanics.
    CheckMechanicals,
    /// Check the UVM driver.
    CheckUvm,
    /// Update software or firmware.
    UpdateSwfw,
    /// Workflow: act on a preceding XID; alone, restart the fabric manager.
    WorkflowXid45,
    /// Workflow: double-bit ECC error (reset; with 63/64 drain and reset).
    WorkflowXid48,
    /// Workflow: NVLink error.
    WorkflowNvlinkErr,
    /// Workflow: NVLink5 error (action decoded from the message).
    WorkflowNvlink5Err,
    /// Follow the recovery action in the message.
    Xid154,
    /// The catalog gives no bucket.
    Unspecified,
}

impl Bucket {
    /// The bucket as NVIDIA writes it (`RESTART_APP`, ...; `NONE` where the catalog has none).
    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::RestartApp => "RESTART_APP",
            Bucket::ResetGpu => "RESET_GPU",
            Bucket::RestartBm => "RESTART_BM",
            Bucket::RestartVm => "RESTART_VM",
            Bucket::ContactSupport => "CONTACT_SUPPORT",
            Bucket::Ignore => "IGNORE",
            Bucket::CheckMechanicals => "CHECK_MECHANICALS",
            Bucket::CheckUvm => "CHECK_UVM",
            Bucket::UpdateSwfw => "UPDATE_SWFW",
            Bucket::WorkflowXid45 => "WORKFLOW_XID_45",
            Bucket::WorkflowXid48 => "WORKFLOW_XID_48",
            Bucket::WorkflowNvlinkErr => "WORKFLOW_NVLINK_ERR",
            Bucket::WorkflowNvlink5Err => "WORKFLOW_NVLINK5_ERR",
            Bucket::Xid154 => "XID_154",
            Bucket::Unspecified => "NONE",
        }
    }
}

/// One row of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub xid: u32,
    /// NVIDIA's mnemonic, e.g. `ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS`.
    pub mnemonic: &'static str,
    /// Resolution bucket, immediate action.
    pub immediate: Bucket,
    /// Resolution bucket, investigatory action, as written (free text in places; empty
    /// where the catalog has none).
    pub investigatory: &'static str,
}

/// Looks a code up; `None` for codes the catalog does not list.
pub fn lookup(xid: u32) -> Option<&'static Entry> {
    let i = usize::try_from(xid.checked_sub(1)?).ok()?;
    CATALOG.get(i).filter(|e| e.xid == xid)
}

/// The immediate bucket's name for a code, `UNKNOWN` for codes not in the catalog (the
/// `class` label of XID counters).
pub fn bucket_name(xid: u32) -> &'static str {
    lookup(xid).map_or("UNKNOWN", |e| e.immediate.as_str())
}

/// Every code of the catalog, sorted by code (entry `i` is XID `i + 1`).
pub static CATALOG: [Entry; 172] = [
    Entry {
        xid: 1,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_FIFO_METHOD",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 2,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_SW_METHOD",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 3,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_UNK_METHOD",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 4,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_CHANNEL_BUSY",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 5,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_RUNOUT_OVERFLOW",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 6,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_PARSE_ERR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 7,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_PTE_ERR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 8,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_IDLE_TIMEOUT",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 9,
        mnemonic: "ROBUST_CHANNEL_GR_ERROR_INSTANCE",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 10,
        mnemonic: "ROBUST_CHANNEL_GR_ERROR_SINGLE_STEP",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 11,
        mnemonic: "ROBUST_CHANNEL_GR_ERROR_MISSING_HW",
        immediate: Bucket::RestartApp,
        investigatory: "CHECK_APP/CUDA",
    },
    Entry {
        xid: 12,
        mnemonic: "ROBUST_CHANNEL_GR_ERROR_SW_METHOD",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 13,
        mnemonic: "ROBUST_CHANNEL_GR_EXCEPTION / ROBUST_CHANNEL_GR_ERROR_SW_NOTIFY",
        immediate: Bucket::RestartApp,
        investigatory: "WORKFLOW_XID_13",
    },
    Entry {
        xid: 14,
        mnemonic: "ROBUST_CHANNEL_FAKE_ERROR",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 15,
        mnemonic: "ROBUST_CHANNEL_SCANLINE_TIMEOUT",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 16,
        mnemonic: "ROBUST_CHANNEL_VBLANK_CALLBACK_TIMEOUT",
        immediate: Bucket::ContactSupport,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 17,
        mnemonic: "ROBUST_CHANNEL_PARAMETER_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 18,
        mnemonic: "ROBUST_CHANNEL_BUS_MASTER_TIMEOUT_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 19,
        mnemonic: "ROBUST_CHANNEL_DISP_MISSED_NOTIFIER",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 20,
        mnemonic: "ROBUST_CHANNEL_MPEG_ERROR_SW_METHOD",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 21,
        mnemonic: "ROBUST_CHANNEL_ME_ERROR_SW_METHOD",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 22,
        mnemonic: "ROBUST_CHANNEL_VP_ERROR_SW_METHOD",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 23,
        mnemonic: "ROBUST_CHANNEL_RC_LOGGING_ENABLED",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 24,
        mnemonic: "ROBUST_CHANNEL_GR_SEMAPHORE_TIMEOUT",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 25,
        mnemonic: "ROBUST_CHANNEL_GR_ILLEGAL_NOTIFY",
        immediate: Bucket::RestartApp,
        investigatory: "CHECK_APP/CUDA",
    },
    Entry {
        xid: 26,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_FBISTATE_TIMEOUT",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 27,
        mnemonic: "ROBUST_CHANNEL_VP_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 28,
        mnemonic: "ROBUST_CHANNEL_VP2_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 29,
        mnemonic: "ROBUST_CHANNEL_BSP_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 30,
        mnemonic: "ROBUST_CHANNEL_BAD_ADDR_ACCESS",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 31,
        mnemonic: "ROBUST_CHANNEL_FIFO_ERROR_MMU_ERR_FLT",
        immediate: Bucket::RestartApp,
        investigatory: "WORKFLOW_XID_31",
    },
    Entry {
        xid: 32,
        mnemonic: "ROBUST_CHANNEL_PBDMA_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CHECK_APP/CUDA",
    },
    Entry {
        xid: 33,
        mnemonic: "ROBUST_CHANNEL_SEC_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 34,
        mnemonic: "ROBUST_CHANNEL_MSVLD_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 35,
        mnemonic: "ROBUST_CHANNEL_MSPDEC_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 36,
        mnemonic: "ROBUST_CHANNEL_MSPPP_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 37,
        mnemonic: "ROBUST_CHANNEL_FECS_ERR_UNIMP_FIRMWARE_METHOD",
        immediate: Bucket::Ignore,
        investigatory: "CHECK_APP/CUDA",
    },
    Entry {
        xid: 38,
        mnemonic: "ROBUST_CHANNEL_FECS_ERR_WATCHDOG_TIMEOUT",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 39,
        mnemonic: "ROBUST_CHANNEL_CE0_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 40,
        mnemonic: "ROBUST_CHANNEL_CE1_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 41,
        mnemonic: "ROBUST_CHANNEL_CE2_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 42,
        mnemonic: "ROBUST_CHANNEL_VIC_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 43,
        mnemonic: "ROBUST_CHANNEL_RESETCHANNEL_VERIF_ERROR",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 44,
        mnemonic: "ROBUST_CHANNEL_GR_FAULT_DURING_CTXSW",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 45,
        mnemonic: "ROBUST_CHANNEL_PREEMPTIVE_REMOVAL",
        immediate: Bucket::WorkflowXid45,
        investigatory: "Solo: RESTART_FM; Not Solo: IGNORE (follow other Xid)",
    },
    Entry {
        xid: 46,
        mnemonic: "ROBUST_CHANNEL_GPU_TIMEOUT_ERROR",
        immediate: Bucket::ResetGpu,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 47,
        mnemonic: "ROBUST_CHANNEL_NVENC0_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 48,
        mnemonic: "ROBUST_CHANNEL_GPU_ECC_DBE",
        immediate: Bucket::WorkflowXid48,
        investigatory: "WORKFLOW_XID_48",
    },
    Entry {
        xid: 49,
        mnemonic: "SILENT_RUNNING_CONSTANT_LEVEL_SET_BY_REGISTRY",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 50,
        mnemonic: "SILENT_RUNNING_LEVEL_TRANSITION_DUE_TO_RC_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 51,
        mnemonic: "SILENT_RUNNING_STRESS_TEST_FAILURE",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 52,
        mnemonic: "SILENT_RUNNING_LEVEL_TRANS_DUE_TO_TEMP_RISE",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 53,
        mnemonic: "SILENT_RUNNING_TEMP_REDUCED_CLOCKING",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 54,
        mnemonic: "SILENT_RUNNING_PWR_REDUCED_CLOCKING",
        immediate: Bucket::CheckMechanicals,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 55,
        mnemonic: "SILENT_RUNNING_TEMPERATURE_READ_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 56,
        mnemonic: "DISPLAY_CHANNEL_EXCEPTION",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 57,
        mnemonic: "FB_LINK_TRAINING_FAILURE_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 58,
        mnemonic: "FB_MEMORY_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 59,
        mnemonic: "PMU_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 60,
        mnemonic: "ROBUST_CHANNEL_SEC2_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "INVESTIGATE_SW",
    },
    Entry {
        xid: 61,
        mnemonic: "PMU_BREAKPOINT",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 62,
        mnemonic: "PMU_HALT_ERROR",
        immediate: Bucket::ResetGpu,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 63,
        mnemonic: "INFOROM_DRAM_RETIREMENT_EVENT",
        immediate: Bucket::Ignore,
        investigatory: "IGNORE",
    },
    Entry {
        xid: 64,
        mnemonic: "INFOROM_DRAM_RETIREMENT_FAILURE",
        immediate: Bucket::ResetGpu,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 65,
        mnemonic: "ROBUST_CHANNEL_NVENC1_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 66,
        mnemonic: "ROBUST_CHANNEL_FECS_ERR_REG_ACCESS_VIOLATION",
        immediate: Bucket::Ignore,
        investigatory: "INVESTIGATE_SW",
    },
    Entry {
        xid: 67,
        mnemonic: "ROBUST_CHANNEL_FECS_ERR_VERIF_VIOLATION",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 68,
        mnemonic: "ROBUST_CHANNEL_NVDEC0_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 69,
        mnemonic: "ROBUST_CHANNEL_GR_CLASS_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CHECK_APP/CUDA",
    },
    Entry {
        xid: 70,
        mnemonic: "ROBUST_CHANNEL_CE3_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 71,
        mnemonic: "ROBUST_CHANNEL_CE4_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 72,
        mnemonic: "ROBUST_CHANNEL_CE5_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 73,
        mnemonic: "ROBUST_CHANNEL_NVENC2_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 74,
        mnemonic: "NVLINK_ERROR",
        immediate: Bucket::WorkflowNvlinkErr,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 75,
        mnemonic: "ROBUST_CHANNEL_CE6_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 76,
        mnemonic: "ROBUST_CHANNEL_CE7_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 77,
        mnemonic: "ROBUST_CHANNEL_CE8_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 78,
        mnemonic: "VGPU_START_ERROR",
        immediate: Bucket::UpdateSwfw,
        investigatory: "UPDATE_SWFW",
    },
    Entry {
        xid: 79,
        mnemonic: "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS",
        immediate: Bucket::RestartBm,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 80,
        mnemonic: "PBDMA_PUSHBUFFER_CRC_MISMATCH",
        immediate: Bucket::RestartApp,
        investigatory: "CHECK_APP/CUDA",
    },
    Entry {
        xid: 81,
        mnemonic: "ROBUST_CHANNEL_VGA_SUBSYSTEM_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 82,
        mnemonic: "ROBUST_CHANNEL_NVJPG0_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 83,
        mnemonic: "ROBUST_CHANNEL_NVDEC1_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 84,
        mnemonic: "ROBUST_CHANNEL_NVDEC2_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 85,
        mnemonic: "ROBUST_CHANNEL_CE9_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 86,
        mnemonic: "ROBUST_CHANNEL_OFA0_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 87,
        mnemonic: "NVTELEMETRY_DRIVER_REPORT",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 88,
        mnemonic: "ROBUST_CHANNEL_NVDEC3_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 89,
        mnemonic: "ROBUST_CHANNEL_NVDEC4_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 90,
        mnemonic: "LTC_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 91,
        mnemonic: "RESERVED_XID",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 92,
        mnemonic: "EXCESSIVE_SBE_INTERRUPTS",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 93,
        mnemonic: "INFOROM_ERASE_LIMIT_EXCEEDED",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 94,
        mnemonic: "ROBUST_CHANNEL_CONTAINED_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "IGNORE (sympathetic)",
    },
    Entry {
        xid: 95,
        mnemonic: "ROBUST_CHANNEL_UNCONTAINED_ERROR",
        immediate: Bucket::ResetGpu,
        investigatory: "IGNORE (sympathetic)",
    },
    Entry {
        xid: 96,
        mnemonic: "ROBUST_CHANNEL_NVDEC5_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 97,
        mnemonic: "ROBUST_CHANNEL_NVDEC6_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 98,
        mnemonic: "ROBUST_CHANNEL_NVDEC7_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 99,
        mnemonic: "ROBUST_CHANNEL_NVJPG1_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 100,
        mnemonic: "ROBUST_CHANNEL_NVJPG2_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 101,
        mnemonic: "ROBUST_CHANNEL_NVJPG3_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 102,
        mnemonic: "ROBUST_CHANNEL_NVJPG4_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 103,
        mnemonic: "ROBUST_CHANNEL_NVJPG5_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 104,
        mnemonic: "ROBUST_CHANNEL_NVJPG6_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 105,
        mnemonic: "ROBUST_CHANNEL_NVJPG7_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 106,
        mnemonic: "SMBPBI_TEST_MESSAGE",
        immediate: Bucket::Ignore,
        investigatory: "IGNORE",
    },
    Entry {
        xid: 107,
        mnemonic: "SMBPBI_TEST_MESSAGE_SILENT",
        immediate: Bucket::Ignore,
        investigatory: "IGNORE",
    },
    Entry {
        xid: 108,
        mnemonic: "NVLINK_REMOTE_TRANSLATION_ERROR",
        immediate: Bucket::Ignore,
        investigatory: "XID_137_FLOW",
    },
    Entry {
        xid: 109,
        mnemonic: "ROBUST_CHANNEL_CTXSW_TIMEOUT_ERROR",
        immediate: Bucket::ResetGpu,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 110,
        mnemonic: "SEC_FAULT_ERROR",
        immediate: Bucket::ResetGpu,
        investigatory: "INVESTIGATE_SW",
    },
    Entry {
        xid: 111,
        mnemonic: "BUNDLE_ERROR_EVENT",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 112,
        mnemonic: "DISP_SUPERVISOR_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 113,
        mnemonic: "DP_LT_FAILURE",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 114,
        mnemonic: "HEAD_RG_UNDERFLOW",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 115,
        mnemonic: "CORE_CHANNEL_REGS",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 116,
        mnemonic: "WINDOW_CHANNEL_REGS",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 117,
        mnemonic: "CURSOR_CHANNEL_REGS",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 118,
        mnemonic: "HEAD_REGS",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 119,
        mnemonic: "GSP_RPC_TIMEOUT",
        immediate: Bucket::ResetGpu,
        investigatory: "INVESTIGATE_SW",
    },
    Entry {
        xid: 120,
        mnemonic: "GSP_ERROR",
        immediate: Bucket::ResetGpu,
        investigatory: "INVESTIGATE_SW",
    },
    Entry {
        xid: 121,
        mnemonic: "C2C_ERROR",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 122,
        mnemonic: "SPI_PMU_RPC_READ_FAIL",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 123,
        mnemonic: "SPI_PMU_RPC_WRITE_FAIL",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 124,
        mnemonic: "SPI_PMU_RPC_ERASE_FAIL",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 125,
        mnemonic: "INFOROM_FS_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 126,
        mnemonic: "ROBUST_CHANNEL_CE10_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 127,
        mnemonic: "ROBUST_CHANNEL_CE11_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 128,
        mnemonic: "ROBUST_CHANNEL_CE12_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 129,
        mnemonic: "ROBUST_CHANNEL_CE13_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 130,
        mnemonic: "ROBUST_CHANNEL_CE14_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 131,
        mnemonic: "ROBUST_CHANNEL_CE15_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 132,
        mnemonic: "ROBUST_CHANNEL_CE16_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 133,
        mnemonic: "ROBUST_CHANNEL_CE17_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 134,
        mnemonic: "ROBUST_CHANNEL_CE18_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 135,
        mnemonic: "ROBUST_CHANNEL_CE19_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 136,
        mnemonic: "ALI_TRAINING_FAIL",
        immediate: Bucket::ResetGpu,
        investigatory: "INVESTIGATE_LINK_SI",
    },
    Entry {
        xid: 137,
        mnemonic: "NVLINK_PRIV_ERR",
        immediate: Bucket::Ignore,
        investigatory: "XID_137_FLOW",
    },
    Entry {
        xid: 138,
        mnemonic: "ROBUST_CHANNEL_DLA_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 139,
        mnemonic: "ROBUST_CHANNEL_OFA1_ERROR",
        immediate: Bucket::RestartApp,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 140,
        mnemonic: "UNRECOVERABLE_ECC_ERROR_ESCAPE",
        immediate: Bucket::ResetGpu,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 141,
        mnemonic: "ROBUST_CHANNEL_FAST_PATH_ERROR",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 142,
        mnemonic: "ROBUST_CHANNEL_NVENC3_ERROR",
        immediate: Bucket::ContactSupport,
        investigatory: "",
    },
    Entry {
        xid: 143,
        mnemonic: "GPU_INIT_ERROR",
        immediate: Bucket::ResetGpu,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 144,
        mnemonic: "NVLINK_SAW_ERROR",
        immediate: Bucket::WorkflowNvlink5Err,
        investigatory: "WORKFLOW_NVLINK5_ERR",
    },
    Entry {
        xid: 145,
        mnemonic: "NVLINK_RLW_ERROR",
        immediate: Bucket::WorkflowNvlink5Err,
        investigatory: "WORKFLOW_NVLINK5_ERR",
    },
    Entry {
        xid: 146,
        mnemonic: "NVLINK_TLW_ERROR",
        immediate: Bucket::WorkflowNvlink5Err,
        investigatory: "WORKFLOW_NVLINK5_ERR",
    },
    Entry {
        xid: 147,
        mnemonic: "NVLINK_TREX_ERROR",
        immediate: Bucket::WorkflowNvlink5Err,
        investigatory: "WORKFLOW_NVLINK5_ERR",
    },
    Entry {
        xid: 148,
        mnemonic: "NVLINK_NVLPW_CTRL_ERROR",
        immediate: Bucket::WorkflowNvlink5Err,
        investigatory: "WORKFLOW_NVLINK5_ERR",
    },
    Entry {
        xid: 149,
        mnemonic: "NVLINK_NETIR_ERROR",
        immediate: Bucket::WorkflowNvlink5Err,
        investigatory: "WORKFLOW_NVLINK5_ERR",
    },
    Entry {
        xid: 150,
        mnemonic: "NVLINK_MSE_ERROR",
        immediate: Bucket::WorkflowNvlink5Err,
        investigatory: "WORKFLOW_NVLINK5_ERR",
    },
    Entry {
        xid: 151,
        mnemonic: "ROBUST_CHANNEL_KEY_ROTATION_ERROR",
        immediate: Bucket::RestartVm,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 152,
        mnemonic: "ROBUST_CHANNEL_DLA_SMMU_ERROR",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 153,
        mnemonic: "ROBUST_CHANNEL_DLA_TIMEOUT",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 154,
        mnemonic: "GPU_RECOVERY_ACTION_CHANGED",
        immediate: Bucket::Xid154,
        investigatory: "N/A Informational only regarding another Xid",
    },
    Entry {
        xid: 155,
        mnemonic: "NVLINK_SW_DEFINED_ERROR",
        immediate: Bucket::ResetGpu,
        investigatory: "INVESTIGATE_SW_USER",
    },
    Entry {
        xid: 156,
        mnemonic: "RESOURCE_RETIREMENT_EVENT",
        immediate: Bucket::ResetGpu,
        investigatory: "IGNORE",
    },
    Entry {
        xid: 157,
        mnemonic: "RESOURCE_RETIREMENT_FAILURE",
        immediate: Bucket::Ignore,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 158,
        mnemonic: "GPU_FATAL_TIMEOUT",
        immediate: Bucket::ResetGpu,
        investigatory: "CONTACT_SUPPORT",
    },
    Entry {
        xid: 159,
        mnemonic: "ROBUST_CHANNEL_CHI_NON_DATA_ERROR",
        immediate: Bucket::CheckUvm,
        investigatory: "SYMPATHETIC_REPORT_SOLO",
    },
    Entry {
        xid: 160,
        mnemonic: "CHANNEL_RETIREMENT_EVENT",
        immediate: Bucket::Ignore,
        investigatory: "INVESTIGATE_SW",
    },
    Entry {
        xid: 161,
        mnemonic: "CHANNEL_RETIREMENT_FAILURE",
        immediate: Bucket::Ignore,
        investigatory: "INVESTIGATE_SW",
    },
    Entry {
        xid: 162,
        mnemonic: "PSHC_REENGAGED",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 163,
        mnemonic: "PSHC_DISENGAGED",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 164,
        mnemonic: "PSHC_LOW_LIFETIME",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 165,
        mnemonic: "PSHC_ZERO_LIFETIME",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 166,
        mnemonic: "NVLINK_SECURE_CRYPTO_ERR",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 167,
        mnemonic: "PCIE_FATAL_TIMEOUT",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 168,
        mnemonic: "REDUCED_GPU_MEMORY_CAPACITY",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 169,
        mnemonic: "SEC2_HALT_ERROR",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 170,
        mnemonic: "NVLINK_SECURE_OTHER",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 171,
        mnemonic: "UNCORRECTABLE_DRAM_ERROR",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
    Entry {
        xid: 172,
        mnemonic: "UNCORRECTABLE_SRAM_ERROR",
        immediate: Bucket::Unspecified,
        investigatory: "",
    },
];
