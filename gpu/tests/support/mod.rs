//! Test support: builds the fake NVML library once, gives each test its own copy of it
//! (a separate copy is a separate library instance with its own state) next to the
//! test's scenario, and waits on conditions with deadlines.

#![allow(dead_code)]

use razar_gpu::NvmlOptions;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Generous: the machine running the tests may be loaded.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The fake library cargo built for this test run (`razar-fake-nvml` is a
/// dev-dependency, so its cdylib lands next to the test executable).
pub fn fake_library() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let library = exe.parent().expect("deps dir").join("libnvidia_ml.so");
        assert!(
            library.exists(),
            "{} missing: run `cargo build -p razar-fake-nvml`",
            library.display()
        );
        library
    })
}

/// A fake GPU host: a private copy of the library with a scenario beside it.
pub struct FakeHost {
    pub dir: tempfile::TempDir,
    pub library: PathBuf,
}

impl FakeHost {
    pub fn new(scenario: &str) -> FakeHost {
        let dir = tempfile::tempdir().expect("tempdir");
        let library = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(fake_library(), &library).expect("copy fake library");
        std::fs::write(dir.path().join("scenario.toml"), scenario).expect("write scenario");
        FakeHost { dir, library }
    }

    /// Sets the scenario time (atomically: write then rename).
    pub fn step(&self, step: u32) {
        let tmp = self.dir.path().join("step.tmp");
        std::fs::write(&tmp, step.to_string()).expect("write step");
        std::fs::rename(&tmp, self.dir.path().join("step")).expect("rename step");
    }

    pub fn kernel_log(&self) -> PathBuf {
        self.dir.path().join("kmsg.log")
    }

    /// Options for this host: its library, its kernel log, short waits.
    pub fn options(&self) -> NvmlOptions {
        NvmlOptions {
            library_path: Some(self.library.clone()),
            kernel_log: Some(self.kernel_log()),
            event_wait: Duration::from_millis(100),
            kernel_log_poll: Duration::from_millis(20),
            ..NvmlOptions::default()
        }
    }
}

/// Polls `check` until it returns `Some`, or panics naming `what` after [`DEADLINE`].
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
