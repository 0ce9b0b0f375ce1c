//! The STDIO launcher: the step between the data plane and a STDIO server that applies the
//! server's resource limits to itself and then becomes the server.
//!
//! A process may always lower its own limits, while lowering another's takes privileges a data
//! plane may not have (`CAP_SYS_RESOURCE`, or the same user, which `stdio.run_as` rules out), and
//! setting them in the child between `fork` and `exec` takes `unsafe` code. So the data plane
//! starts its own binary in launcher mode (`<binary> stdio-launch …`) as the child, already in the
//! child's directory, environment, process group and OS user; the launcher sets the limits and
//! `exec`s the server, which keeps its pid and inherits the limits (as does everything it starts).
//! Nothing runs between the limits and the server but this code.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;

use nix::sys::resource::{setrlimit, Resource};

/// The subcommand (first argument) that runs [`main`].
pub const SUBCOMMAND: &str = "stdio-launch";

/// The limits one launch applies, as passed on its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// RLIMIT_AS, bytes; 0: none.
    pub memory_bytes: u64,
    /// RLIMIT_NOFILE; 0: none.
    pub open_files: u64,
    /// RLIMIT_NPROC; 0: none.
    pub processes: u64,
}

impl Limits {
    /// The launcher's arguments before the command: `--as N --nofile N --nproc N --`.
    pub fn to_args(self) -> Vec<String> {
        vec![
            "--as".into(),
            self.memory_bytes.to_string(),
            "--nofile".into(),
            self.open_files.to_string(),
            "--nproc".into(),
            self.processes.to_string(),
            "--".into(),
        ]
    }
}

/// Parses `[--as N] [--nofile N] [--nproc N] -- COMMAND [ARGS…]` (the arguments after the
/// subcommand).
pub fn parse(args: &[OsString]) -> Result<(Limits, Vec<OsString>), String> {
    let mut limits = Limits::default();
    let mut rest = args.iter();
    loop {
        let Some(flag) = rest.next() else { return Err("no `--` before the command".into()) };
        if flag == "--" {
            break;
        }
        let value = rest.next().and_then(|v| v.to_str()).and_then(|v| v.parse::<u64>().ok());
        let value = value.ok_or_else(|| format!("{} needs a number", flag.to_string_lossy()))?;
        match flag.to_str() {
            Some("--as") => limits.memory_bytes = value,
            Some("--nofile") => limits.open_files = value,
            Some("--nproc") => limits.processes = value,
            _ => return Err(format!("unknown option {}", flag.to_string_lossy())),
        }
    }
    let command: Vec<OsString> = rest.cloned().collect();
    if command.is_empty() {
        return Err("no command after `--`".into());
    }
    Ok((limits, command))
}

fn apply(limits: Limits) -> nix::Result<()> {
    for (resource, value) in [
        (Resource::RLIMIT_AS, limits.memory_bytes),
        (Resource::RLIMIT_NOFILE, limits.open_files),
        (Resource::RLIMIT_NPROC, limits.processes),
    ] {
        if value > 0 {
            setrlimit(resource, value, value)?;
        }
    }
    // No core dumps: a dump of a server's memory holds its credentials.
    setrlimit(Resource::RLIMIT_CORE, 0, 0)
}

/// Runs the launcher: applies the limits, then becomes the command. Returns only on failure,
/// with the exit code to use (126: the limits could not be set; 127: the command could not run).
pub fn main(args: &[OsString]) -> i32 {
    let (limits, command) = match parse(args) {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("reflow stdio-launch: {error}");
            return 2;
        }
    };
    if let Err(error) = apply(limits) {
        eprintln!("reflow stdio-launch: cannot set resource limits: {error}");
        return 126;
    }
    let argv: Result<Vec<CString>, _> = command.iter().map(|a| CString::new(a.as_bytes())).collect();
    let Ok(argv) = argv else {
        eprintln!("reflow stdio-launch: an argument holds a NUL byte");
        return 2;
    };
    let error = nix::unistd::execvp(&argv[0], &argv).unwrap_err();
    eprintln!("reflow stdio-launch: cannot run {}: {error}", command[0].to_string_lossy());
    127
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &[&str]) -> Vec<OsString> {
        text.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_round_trip_and_bad_ones_are_refused() {
        let limits = Limits { memory_bytes: 1 << 30, open_files: 256, processes: 24 };
        let mut line = limits.to_args();
        line.extend(["python3".to_string(), "--".to_string(), "-x".to_string()]);
        let line: Vec<OsString> = line.into_iter().map(OsString::from).collect();
        let (parsed, command) = parse(&line).unwrap();
        assert_eq!(parsed, limits);
        assert_eq!(command, args(&["python3", "--", "-x"]));
        assert!(parse(&args(&["--as", "x", "--", "a"])).is_err());
        assert!(parse(&args(&["--what", "1", "--", "a"])).is_err());
        assert!(parse(&args(&["--as", "1"])).is_err());
        assert!(parse(&args(&["--"])).is_err());
    }
}
