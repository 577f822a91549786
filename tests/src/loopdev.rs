//! [`LoopDevice`]: a loop block device over a file, for tests that need the kernel's block
//! layer and page cache between a program and a [`FaultFs`](crate::faultfs::FaultFs) file
//! (faultfs itself is direct I/O: no page cache of its own).
//!
//! The device is configured with `LOOP_CONFIGURE` (buffered access to the backing file, no
//! partition scan) and with `LO_FLAGS_AUTOCLEAR`, and the guard holds it open: the kernel
//! detaches it when the last descriptor closes, so it goes away when the guard is dropped
//! (also when the test panics) and when the test process dies (a watchdog's abort).
//! Drop the processes that use the device before the guard, and the guard before the
//! filesystem its backing file lives on.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::{wait_until, TIMEOUT};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LOOP_MAJOR: u32 = 7;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// A configured loop device, detached when dropped.
pub struct LoopDevice {
    /// Holds the device open (with autoclear, the last close detaches it).
    dev: Option<File>,
    path: PathBuf,
    minor: u32,
}

impl LoopDevice {
    /// Binds a free loop device to `backing` (read-write, buffered). Panics, naming what is
    /// missing, if this host has no loop devices or the caller may not configure them.
    pub fn attach(backing: &Path) -> LoopDevice {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .unwrap_or_else(|e| panic!("open loop backing file {}: {e}", backing.display()));
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .unwrap_or_else(|e| {
                panic!(
                    "this test needs loop devices: open /dev/loop-control: {e} (a kernel with \
                     CONFIG_BLK_DEV_LOOP, run as root)"
                )
            });
        for _ in 0..20 {
            // SAFETY: an ioctl without an argument on a descriptor we own.
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                panic!(
                    "this test needs a free loop device: LOOP_CTL_GET_FREE: {}",
                    std::io::Error::last_os_error()
                );
            }
            let minor = u32::try_from(n).expect("loop device number");
            let path = PathBuf::from(format!("/dev/loop{minor}"));
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            let cfg = LoopConfig {
                fd: u32::try_from(file.as_raw_fd()).expect("fd"),
                block_size: 0,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: LO_FLAGS_AUTOCLEAR,
                    lo_file_name: [0; 64],
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` (laid out as in linux/loop.h)
            // that lives on our stack for the duration of the call.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
            if r == 0 {
                // The device holds its own reference to the backing file now.
                return LoopDevice {
                    dev: Some(dev),
                    path,
                    minor,
                };
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                panic!(
                    "LOOP_CONFIGURE {} over {}: {e}",
                    path.display(),
                    backing.display()
                );
            }
            // Another process took it between GET_FREE and CONFIGURE: try the next one.
        }
        panic!("no free loop device after 20 tries");
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a block special file for this device at `at` (a device node in a test's own
    /// directory, so that files a program keeps beside its image land there too).
    pub fn mknod(&self, at: &Path) {
        let c = CString::new(at.as_os_str().as_bytes()).expect("no NUL in path");
        let dev = libc::makedev(LOOP_MAJOR, self.minor);
        // SAFETY: mknod reads a valid NUL-terminated path; no other memory is passed.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, dev) };
        assert!(
            r == 0,
            "mknod {} (block 7:{}): {}",
            at.display(),
            self.minor,
            std::io::Error::last_os_error()
        );
    }

    /// Whether the device is still bound to a file.
    fn bound(&self) -> bool {
        Path::new(&format!("/sys/block/loop{}/loop/backing_file", self.minor)).exists()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // Autoclear: our close is the last one unless a process still has the device open.
        drop(self.dev.take());
        if !wait_until(TIMEOUT, || !self.bound()) {
            eprintln!(
                "{} is still bound {TIMEOUT:?} after the test let go of it (still open \
                 elsewhere?); it detaches at its last close",
                self.path.display()
            );
        }
    }
}
