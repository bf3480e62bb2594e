//! Named VMs: `cvm start` (and the `__vm-daemon` it becomes), `cvm exec`, `cvm ps`.

use super::*;

#[derive(clap::Args, Clone)]
pub(crate) struct StartArgs {
    /// The VM's name: letters, digits, '.', '_', '-'.
    #[arg(long, value_parser = |s: &str| cvm::session::named::validate_name(s).map(|()| s.to_string()))]
    pub name: String,
    /// The project, shared as with `cvm run`.
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub forwards: ForwardArgs,
}

/// `cvm start`: this command line again, as `cvm __vm-daemon`, in the background.
pub(crate) fn start(args: &StartArgs) -> anyhow::Result<()> {
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    cvm::session::named::spawn(&args.name, &argv)?;
    println!("{}", args.name);
    Ok(())
}

/// The daemon's `cvm start` command line, NUL-separated on its standard input.
pub(crate) fn daemon_command_line() -> anyhow::Result<Cli> {
    use std::io::Read;
    const MAX: u64 = 1 << 20;
    let mut bytes = Vec::new();
    std::io::stdin().take(MAX + 1).read_to_end(&mut bytes)?;
    anyhow::ensure!(bytes.len() as u64 <= MAX, "the command line on standard input is over {MAX} bytes");
    let cli = Cli::try_parse_from(std::iter::once(OsString::from("cvm")).chain(nul_terminated_words(&bytes)))?;
    anyhow::ensure!(matches!(cli.command, Command::Start(_)), "__vm-daemon was given a command line that is not `cvm start`");
    Ok(cli)
}

/// Words each ended by a NUL, empty ones included (`-e NAME=` is one word, `""` another).
pub(crate) fn nul_terminated_words(bytes: &[u8]) -> Vec<OsString> {
    use std::os::unix::ffi::OsStringExt;
    let mut words: Vec<OsString> = bytes.split(|b| *b == 0).map(|w| OsString::from_vec(w.to_vec())).collect();
    words.pop(); // what follows the last NUL: nothing, in a well-formed line
    words
}

/// `cvm __vm-daemon`: the session of a named VM, kept until stopped.
pub(crate) fn vm_daemon(args: &StartArgs) -> anyhow::Result<()> {
    let dir = cvm::session::named::state_dir(&args.name)?;
    let project = args.path.clone();
    let canonical = project.as_ref().and_then(|p| p.canonicalize().ok());
    let settings = settings(args.vm.flags(), canonical.as_deref())?;
    let mut config = session_config(&settings, &args.vm, args.forwards.request()?, project, true)?;
    // Its console is what `cvm logs NAME` shows: kernel and agent messages included.
    config.debug = true;
    if let (Some(project), cvm::project::images::Image::Disk(image)) = (&canonical, &config.image) {
        config.template = cvm::project::template::find(project, image);
    }
    let session = cvm::session::Session::start(&config, None)?;
    let info = cvm::session::named::VmInfo {
        name: args.name.clone(),
        pid: std::process::id(),
        project: canonical,
        engine: config.engine.name().into(),
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        console_log: session.console_log().to_path_buf(),
    };
    let result = cvm::session::named::serve(session, info, &dir);
    cvm::session::named::clear(&args.name);
    result
}

/// `cvm exec NAME [-- CMD]`: a shell by default.
pub(crate) fn vm_exec(name: &str, command: Vec<OsString>) -> anyhow::Result<u8> {
    let argv = if command.is_empty() { vec!["/bin/sh".into(), "-l".into()] } else { command };
    cvm::session::named::exec(name, cvm::session::run::exec_request(argv))
}

pub(crate) fn ps(json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let vms = cvm::session::named::list();
    // A closed pipe (`cvm ps | head`) ends the listing quietly.
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&vms)?);
        return Ok(());
    }
    let _ = writeln!(out, "{:<20} {:<8} {:<8} {:>8}  PROJECT", "NAME", "STATUS", "ENGINE", "PID");
    for vm in vms {
        let project = vm.info.project.as_ref().map_or("-".into(), |p| p.display().to_string());
        let _ = writeln!(out, "{:<20} {:<8} {:<8} {:>8}  {project}", vm.info.name, vm.status, vm.info.engine, vm.info.pid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_s_command_line_keeps_empty_words_and_nothing_after_the_last_nul() {
        let words = |bytes: &[u8]| nul_terminated_words(bytes).into_iter().map(|w| w.into_string().unwrap()).collect::<Vec<_>>();
        assert_eq!(words(b"start\0--name\0a\0-e\0K=\0\0"), ["start", "--name", "a", "-e", "K=", ""]);
        assert_eq!(words(b""), Vec::<String>::new());
        assert_eq!(words(b"start\0cut sh"), ["start"], "an unterminated last word is dropped");
    }
}
