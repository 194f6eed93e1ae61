//! Network sysctls. Files under /proc/sys/net belong to the namespace of the
//! thread that opens them, so these act on the caller's namespace.

use crate::error::{KernelError, Result};

pub fn set(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|e| KernelError::io(format!("set {key}={value}"), e))
}

pub fn get(key: &str) -> Result<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| KernelError::io(format!("read {key}"), e))
}
