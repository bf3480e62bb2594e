//! Project templates and trust: `cvm list`, `info`, `clean`, `clean-all`, `trust`.

use super::*;

/// The image `--image debian` uses now, if built.
pub(crate) fn current_debian() -> Option<PathBuf> {
    match cvm::project::images::image("debian") {
        Ok(cvm::project::images::Image::Disk(path)) => Some(path),
        _ => None,
    }
}

pub(crate) fn list_templates(disk_usage: bool, unused_only: bool) -> anyhow::Result<()> {
    let current = current_debian();
    for t in cvm::project::template::list() {
        let unused = t.unused(current.as_deref());
        if unused_only && !unused {
            continue;
        }
        let size = if disk_usage { format!("{:>8}M  ", t.bytes >> 20) } else { String::new() };
        println!("{size}{}{}", t.project.display(), if unused { "  (unused)" } else { "" });
    }
    Ok(())
}

pub(crate) fn info(path: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let project = project_or_cwd(path)?;
    let image = current_debian();
    let kernel = cvm::project::images::kernel(None);
    let template = image.as_deref().and_then(|i| cvm::project::template::find(&project, i));
    if json {
        let value = serde_json::json!({
            "project": project,
            "image": image,
            "kernel": kernel.as_ref().ok(),
            "template": template,
            "worktree_of": cvm::guest::shares::main_repository(&project),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("project:  {}", project.display());
    println!("image:    {}", image.as_ref().map_or("debian: not built (cvm image build)".into(), |p| p.display().to_string()));
    println!("kernel:   {}", kernel.map_or_else(|e| e.to_string(), |p| p.display().to_string()));
    println!("template: {}", template.map_or("none (cvm setup makes one)".into(), |p| p.display().to_string()));
    Ok(())
}

pub(crate) fn clean(path: Option<PathBuf>, yes: bool) -> anyhow::Result<()> {
    let project = project_or_cwd(path)?;
    let Some(template) = cvm::project::template::list().into_iter().find(|t| t.project == project) else {
        println!("{} has no template", project.display());
        return Ok(());
    };
    confirm(&format!("Remove the template of {}?", project.display()), yes)?;
    cvm::project::template::remove(&template)?;
    println!("removed the template of {}", project.display());
    Ok(())
}

pub(crate) fn clean_all(yes: bool) -> anyhow::Result<()> {
    let all = cvm::project::template::list();
    let snapshots = cvm::session::warm::list();
    if all.is_empty() && snapshots.is_empty() {
        return Ok(());
    }
    confirm(&format!("Remove all {} templates and {} warm-start snapshots?", all.len(), snapshots.len()), yes)?;
    for t in &all {
        cvm::project::template::remove(t)?;
        println!("removed the template of {}", t.project.display());
    }
    for snapshot in &snapshots {
        cvm::session::warm::remove(&snapshot.key)?;
        println!("removed the warm-start snapshot {}", snapshot.key);
    }
    Ok(())
}

/// Asks on the terminal; without one, only `--yes` agrees.
pub(crate) fn confirm(question: &str, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        anyhow::bail!("{question} Pass --yes to agree without a terminal.");
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        anyhow::bail!("nothing removed");
    }
    Ok(())
}

/// `cvm trust`: records (or forgets) each of the project's own layer files.
pub(crate) fn trust(path: Option<PathBuf>, revoke: bool) -> anyhow::Result<()> {
    let path = project_or_cwd(path)?;
    let files = match path.is_dir() {
        true => cvm::config::project_layer_files(&home_dir(), &path),
        false => vec![path.clone()],
    };
    anyhow::ensure!(!files.is_empty(), "{} has no {} to trust", path.display(), cvm::host::CONFIG_FILE);
    let store = cvm::config::trust_store::Store::new();
    for file in files {
        if revoke {
            let was = if store.revoke(&file)? { "no longer trusted" } else { "was not trusted" };
            println!("{was}: {}", file.display());
            continue;
        }
        let widening = cvm::config::trust(&file, &home_dir(), &store)?;
        println!("trusted {}{}", file.display(), if widening.is_empty() { ": it widens nothing" } else { ", which sets:" });
        for (key, value) in widening {
            println!("  {key} = {value}");
        }
    }
    Ok(())
}

pub(crate) fn project_or_cwd(path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = path.unwrap_or_else(|| PathBuf::from("."));
    path.canonicalize().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
