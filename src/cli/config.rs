//! `cvm config show|validate`: the layered configuration.

use super::*;

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Print the effective configuration for a project and where each value came from.
    Show {
        /// The project (default: the current directory).
        path: Option<PathBuf>,
    },
    /// Check configuration files: unknown keys and bad values, with file, line and column.
    /// Without FILE: every file the current directory's sessions read.
    Validate { file: Option<PathBuf> },
}

pub(crate) fn config_command(command: ConfigCommand) -> ExitCode {
    match command {
        ConfigCommand::Show { path } => report(project_or_cwd(path).and_then(|project| {
            print!("{}", settings(Flags::default(), Some(&project))?.show());
            Ok(())
        })),
        ConfigCommand::Validate { file } => {
            let files = match file {
                Some(file) => vec![file],
                None => cvm::config::layer_files(&home_dir(), std::env::current_dir().ok().as_deref()),
            };
            if files.is_empty() {
                println!("no configuration files here (~/.cvm.toml, .cvm.toml)");
            }
            let mut failed = false;
            for file in files {
                match cvm::config::validate(&file, &home_dir()) {
                    Ok(()) => println!("{}: ok", file.display()),
                    Err(e) => {
                        eprintln!("{e:#}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
