use super::*;

const HOME: &str = "/home/dev";

/// Pieces of configuration files, valid and not, to build hostile files from.
const PIECES: &[&str] = &[
    "[vm]\n",
    "cpus = 2\n",
    "cpus = 0\n",
    "cpus = 300\n",
    "memory = \"1T\"\n",
    "memory = \"12Q\"\n",
    "timeout = \"-1s\"\n",
    "vmm = \"qemu\"\n",
    "image = \"/etc/passwd\"\n",
    "[network]\n",
    "mode = \"open\"\n",
    "allow = [\"*.x\", \"\"]\n",
    "allow = { replace = [] }\n",
    "allow = { replace = 3 }\n",
    "hosts = [\"a:1.2.3.4\", \"b:nope\"]\n",
    "[[mounts]]\n",
    "host = \"~\"\n",
    "host = \"../../..\"\n",
    "guest = \"/\"\n",
    "read_only = true\n",
    "[tools]\n",
    "node = true\n",
    "cobol = true\n",
    "[runtime]\n",
    "scripts = [\"../x.sh\"]\n",
    "[secrets]\n",
    "env_file = \"/dev/zero\"\n",
    "[secrets.proxied.T]\n",
    "hosts = [\"a.test\"]\n",
    "command = []\n",
    "env = \"X\"\n",
    "[[",
    "]]\n",
    "= \"\n",
    "\u{0}",
    "\u{feff}",
    "\"\"\"\n",
    "x.y.z = 1\n",
    "[vm.cpus]\n",
];

// Cases: PROPTEST_CASES (scripts/test sets thousands; more by hand for a soak).
proptest::proptest! {
    /// Any file, from the user or planted by a guest: parsed and applied, or refused at a
    /// line and column inside it. Never a panic.
    #[test]
    fn any_file_is_applied_or_refused_at_a_place_in_it(pieces in proptest::collection::vec(proptest::sample::select(PIECES), 0..12), noise in ".{0,20}") {
        let text = pieces.concat() + &noise;
        let path = Path::new("/p/.cvm.toml");
        let result = parse_file(path, &text).and_then(|file| {
            let _ = file.widening(path, Path::new(HOME));
            Settings::defaults().apply_file(file, path, &text, Path::new(HOME))
        });
        if let Err(e) = result {
            proptest::prop_assert!(e.line >= 1 && e.line <= text.lines().count().max(1) + 1, "{e} in {text:?}");
        }
    }
}

/// Applies each (file name, text) as a layer, in order.
fn layered(files: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let mut settings = Settings::defaults();
    for (name, text) in files {
        let path = Path::new(name);
        let file = parse_file(path, text)?;
        settings.apply_file(file, path, text, Path::new(HOME))?;
    }
    Ok(settings)
}

#[test]
fn proxied_secrets_are_declared_in_the_users_file_only_and_shown_as_placeholders() {
    let global = "[secrets.proxied.GH_TOKEN]\nhosts = [\"github.com\", \"*.github.com\"]\ncommand = [\"gh\", \"auth\", \"token\"]\n[secrets.proxied.KEY]\nhosts = [\"api.test\"]\nfile = \"~/.key\"\n";
    let s = layered(&[("/home/dev/.cvm.toml", global)]).unwrap();
    let sources: Vec<&SecretSource> = s.proxied_secrets.value.iter().map(|p| &p.source).collect();
    assert_eq!(
        sources,
        [&SecretSource::Command(vec!["gh".into(), "auth".into(), "token".into()]), &SecretSource::File("/home/dev/.key".into())]
    );
    let shown = s.show();
    assert!(
        shown.lines().any(|l| l.starts_with("secrets.proxied.GH_TOKEN")
            && l.contains("placeholder in the guest")
            && l.contains("\"*.github.com\"")
            && l.contains("command `gh auth token`")),
        "{shown}"
    );
    for (text, says) in [
        ("[secrets.proxied.K]\nhosts = []\n", "at least one host"),
        ("[secrets.proxied.K]\nhosts = [\"a b\"]\n", "bad host pattern"),
        ("[secrets.proxied.1K]\nhosts = [\"a.test\"]\n", "not a variable name"),
        ("[secrets.proxied.K]\nhosts = [\"a.test\"]\nenv = \"A\"\nfile = \"/f\"\n", "one of file, env and command"),
        ("[secrets.proxied.K]\nhosts = [\"a.test\"]\ncommand = []\n", "empty command"),
        ("[secrets.proxied.K]\nhosts = [\"a.test\"]\nvalue = \"inline\"\n", "unknown field"),
    ] {
        let e = layered(&[("/home/dev/.cvm.toml", text)]).unwrap_err();
        assert!(e.to_string().contains(says), "{text:?}: {e}");
    }
    // A project's file, which the guest can write, may not declare one, trusted or not.
    let dir = tempfile::tempdir().unwrap();
    let project_file = dir.path().join(".cvm.toml");
    std::fs::write(&project_file, global).unwrap();
    let store = crate::config::trust_store::Store::at(dir.path().join("trusted"));
    for e in [read_layer(&project_file, Path::new(HOME), &store).unwrap_err(), trust(&project_file, Path::new(HOME), &store).unwrap_err()] {
        assert!(e.to_string().contains("[secrets.proxied] is read only from ~/.cvm.toml"), "{e}");
    }
}

fn file(name: &str) -> Source {
    Source::File(name.into())
}

#[test]
fn a_project_value_equal_to_the_default_still_overrides_the_global_one() {
    let s = layered(&[("/home/dev/.cvm.toml", "[vm]\ncpus = 4\nmemory = \"2G\"\n"), ("/p/.cvm.toml", "[vm]\ncpus = 2\n")]).unwrap();
    assert_eq!(s.cpus, Sourced { value: 2, sources: vec![file("/p/.cvm.toml")] });
    assert_eq!(
        s.memory,
        Sourced { value: 2 << 30, sources: vec![file("/home/dev/.cvm.toml")] },
        "a key the project leaves alone stays global"
    );
}

#[test]
fn a_tool_turned_off_by_the_project_stays_off() {
    let s =
        layered(&[("/home/dev/.cvm.toml", "[tools]\nnode = true\npython = true\n"), ("/p/.cvm.toml", "[tools]\nnode = false\n")]).unwrap();
    assert_eq!(s.tools_on(), ["python"]);
    assert_eq!(s.tools["node"].sources, [file("/p/.cvm.toml")]);
}

#[test]
fn claude_args_are_never_duplicated() {
    let s = layered(&[
        ("/home/dev/.cvm.toml", "[defaults]\nclaude_args = [\"--model\", \"opus\", \"--verbose\"]\n"),
        ("/p/.cvm.toml", "[defaults]\nclaude_args = [\"--verbose\", \"--dangerously-skip-permissions\"]\n"),
    ])
    .unwrap();
    assert_eq!(s.agent_command(), ["claude", "--dangerously-skip-permissions", "--model", "opus", "--verbose"]);
    let s = layered(&[("/p/.cvm.toml", "[defaults]\ncommand = [\"bash\", \"-l\"]\n")]).unwrap();
    assert_eq!(s.agent_command(), ["bash", "-l"]);
}

#[test]
fn lists_extend_unless_they_say_replace() {
    let s = layered(&[
        ("/home/dev/.cvm.toml", "[packages]\nsystem = [\"jq\", \"make\"]\n[network]\nallow = [\"example.com\"]\n"),
        ("/p/.cvm.toml", "[packages]\nsystem = [\"make\", \"zip\"]\n[network]\nallow = { replace = [\"api.anthropic.com\"] }\n"),
    ])
    .unwrap();
    assert_eq!(s.packages.value, ["jq", "make", "zip"]);
    assert_eq!(s.packages.sources, [file("/home/dev/.cvm.toml"), file("/p/.cvm.toml")]);
    assert_eq!(s.allow.value, ["api.anthropic.com"]);
    assert_eq!(s.allow.sources, [file("/p/.cvm.toml")]);
    let s = layered(&[("/p/.cvm.toml", "[network]\nallow = [\"example.com\"]\n")]).unwrap();
    assert!(s.allow.value.len() > 1 && s.allow.value.last().unwrap() == "example.com", "the default list is extended");
}

#[test]
fn env_overrides_files_and_flags_override_env() {
    let mut s = layered(&[("/p/.cvm.toml", "[vm]\ncpus = 4\nmemory = \"1G\"\nvmm = \"qemu\"\n")]).unwrap();
    s.apply_env(|name| (name == "CVM_CPUS").then(|| "3".to_string())).unwrap();
    assert_eq!((s.cpus.value, &s.cpus.sources[..]), (3, &[Source::Env("CVM_CPUS")][..]));
    s.apply_flags(Flags { cpus: Some(1), mounts: vec![], ..Flags::default() });
    assert_eq!((s.cpus.value, &s.cpus.sources[..]), (1, &[Source::Flag][..]));
    assert_eq!(s.vmm.value, VmmChoice::Qemu);
    assert_eq!(s.memory.value, 1 << 30);
    for (name, value) in [
        ("CVM_CPUS", "0"),
        ("CVM_CPUS", "many"),
        ("CVM_MEMORY", "lots"),
        ("CVM_VMM", "xen"),
        ("CVM_NETWORK", "wide"),
        ("CVM_TIMEOUT", "soon"),
    ] {
        let err = Settings::defaults().apply_env(|n| (n == name).then(|| value.to_string())).unwrap_err();
        assert!(err.to_string().starts_with(&format!("${name}: ")), "{err}");
    }
}

#[test]
fn ci_caps_apply_and_can_be_overridden() {
    let mut s = Settings::defaults();
    s.apply_ci(1);
    assert_eq!((s.cpus.value, s.timeout.value), (1, Some(CI_TIMEOUT)));
    assert_eq!(s.timeout.sources, [Source::Ci]);
    let path = Path::new("/p/.cvm.toml");
    let text = "[vm]\ntimeout = \"10m\"\n";
    s.apply_file(parse_file(path, text).unwrap(), path, text, Path::new(HOME)).unwrap();
    assert_eq!(s.timeout.value, Some(Duration::from_secs(600)));
}

#[test]
fn paths_are_relative_to_their_file_and_home() {
    let s = layered(&[(
        "/p/.cvm.toml",
        "[runtime]\nscripts = [\"ci/env.sh\", \"~/x.sh\", \"/abs.sh\"]\n[[mounts]]\nhost = \"../data\"\nguest = \"/data\"\nread_only = true\n[[setup.mounts]]\nhost = \"~/cache\"\n[secrets]\nenv_file = \"secrets.env\"\n",
    )])
    .unwrap();
    assert_eq!(s.runtime_scripts.value, [PathBuf::from("/p/ci/env.sh"), "/home/dev/x.sh".into(), "/abs.sh".into()]);
    assert_eq!(s.mounts.value, [MountSpec { host: "/data".into(), guest: "/data".into(), read_only: true }]);
    assert_eq!(s.setup_mounts.value, [MountSpec { host: "/home/dev/cache".into(), guest: "/home/dev/cache".into(), read_only: false }]);
    assert_eq!(s.secrets_file.value, Some(PathBuf::from("/p/secrets.env")));
}

#[test]
fn errors_name_the_file_line_and_column() {
    let cases = [
        ("[vm]\ncpus = 2\nmemroy = \"1G\"\n", 3, 1, "unknown key `memroy` in [vm]"),
        ("[vm]\ncpus = true\n", 2, 8, "a string or a number"),
        ("[vm]\nmemory = \"lots\"\n", 2, 10, "invalid memory size"),
        ("[vm]\nvmm = \"xen\"\n", 2, 7, "unknown vmm \"xen\""),
        ("[vm]\ncpus = 0\n", 2, 8, "at least 1"),
        ("[vm]\ncpus = 300\n", 2, 8, ""),
        ("[tools]\nnode = true\ncobol = true\n", 3, 1, "unknown tool \"cobol\""),
        ("[network]\nmode = \"wide\"\n", 2, 8, "unknown network mode"),
        ("[network]\nhosts = [\"db\"]\n", 2, 10, "expected NAME:IP"),
        ("[network]\nallow = [\"exa mple.com\"]\n", 2, 10, ""),
        ("[[mounts]]\nhost = \"/data\"\nguest = \"relative\"\n", 2, 8, "absolute"),
        ("[sandbox]\n", 1, 2, "unknown field `sandbox`"),
        ("[vm\n", 1, 4, ""),
        ("[env]\nA = \"1\"\nHTTPS_PROXY = \"http://elsewhere\"\n", 3, 1, "HTTPS_PROXY is cvm's to set"),
        ("[env]\nCVM_VMM = \"qemu\"\n", 2, 1, "CVM_VMM is cvm's to set"),
        ("[env]\nA = 1\n", 2, 5, "invalid type"),
    ];
    for (text, line, column, message) in cases {
        let err = layered(&[("/p/.cvm.toml", text)]).unwrap_err();
        assert_eq!((err.line, err.column), (line, column), "{text:?}: {err}");
        assert!(err.message.contains(message), "{text:?}: {err}");
        assert!(err.to_string().starts_with(&format!("/p/.cvm.toml:{line}:{column}: ")), "{err}");
    }
}

#[test]
fn a_worktree_reads_its_main_repositorys_file_before_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (main, wt) = crate::guest::shares::fake_worktree(dir.path());
    for d in [&home, &main, &wt] {
        std::fs::write(d.join(CONFIG_FILE), "").unwrap();
    }
    let main = main.canonicalize().unwrap();
    assert_eq!(layer_files(&home, Some(&wt)), [home.join(CONFIG_FILE), main.join(CONFIG_FILE), wt.join(CONFIG_FILE)]);
    assert_eq!(layer_files(&home, Some(&main)), [home.join(CONFIG_FILE), main.join(CONFIG_FILE)], "the main checkout reads its own once");
    assert_eq!(layer_files(&home, None), [home.join(CONFIG_FILE)]);
    std::fs::remove_file(home.join(CONFIG_FILE)).unwrap();
    assert_eq!(layer_files(&home, None), Vec::<PathBuf>::new(), "missing files are no layers");
}

#[test]
fn show_names_every_source_and_no_secret() {
    let s = layered(&[("/home/dev/.cvm.toml", "[vm]\ncpus = 4\n[secrets]\nenv_file = \"/s.env\"\n")]).unwrap();
    let shown = s.show();
    assert!(shown.lines().any(|l| l.starts_with("vm.cpus") && l.contains("= 4") && l.ends_with("# /home/dev/.cvm.toml")), "{shown}");
    assert!(shown.lines().any(|l| l.starts_with("vm.memory") && l.ends_with("# default")), "{shown}");
    assert!(shown.lines().any(|l| l.starts_with("secrets.env_file") && l.contains("/s.env")), "{shown}");
}

/// The key table is the one way in: each key, set to its example in a file and in its
/// variable, is read from both and shown with where it came from.
#[test]
fn every_key_is_read_from_a_file_and_its_variable_and_shown() {
    for key in keys::KEYS {
        let (table, name) = key.name.split_once('.').unwrap();
        let text = format!("[{table}]\n{name} = {:?}\n", key.example);
        let from_file = layered(&[("/p/.cvm.toml", &text)]).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let line = |s: &Settings| {
            s.show()
                .lines()
                .find(|l| l.split_whitespace().next() == Some(key.name))
                .map(str::to_string)
                .unwrap_or_else(|| panic!("{} is not shown", key.name))
        };
        assert!(line(&from_file).ends_with("# /p/.cvm.toml"), "{}", line(&from_file));
        assert_ne!(line(&from_file), line(&Settings::defaults()), "{}: its example is its default", key.name);
        let env = key.env.expect("every single-valued key has a variable");
        let mut from_env = Settings::defaults();
        from_env.apply_env(|name| (name == env).then(|| key.example.to_string())).unwrap();
        assert!(line(&from_env).ends_with(&format!("# ${env}")), "{}", line(&from_env));
        let bad = format!("[{table}]\n{name} = \"not-a-{name}\"\n");
        if key.name != "vm.image" {
            assert!(layered(&[("/p/.cvm.toml", &bad)]).is_err(), "{bad:?} was taken");
        }
    }
}

/// The README's configuration reference (its example file, its list of variables) has every
/// key and variable.
#[test]
fn the_readme_lists_every_key_and_its_variable() {
    let readme = include_str!("../../README.md");
    let example = readme.split("```toml\n").nth(1).and_then(|rest| rest.split("```").next()).expect("the README's example .cvm.toml");
    for key in keys::KEYS {
        let (table, name) = key.name.split_once('.').unwrap();
        let section = example
            .split(&format!("[{table}]\n"))
            .nth(1)
            .and_then(|rest| rest.split("\n[").next())
            .unwrap_or_else(|| panic!("no [{table}] in the README's example"));
        assert!(section.lines().any(|l| l.starts_with(&format!("{name} = "))), "the README's example does not set {}", key.name);
        if let Some(env) = key.env {
            assert!(readme.contains(&format!("`{env}`")), "README.md does not document ${env}");
        }
    }
}

/// A `[[mounts]]` path is taken as written, a `:` in it included (it is not a `--mount` spec).
#[test]
fn a_mount_path_with_a_colon_is_taken_as_written() {
    let s = layered(&[("/p/.cvm.toml", "[[mounts]]\nhost = \"/data/a:b\"\nguest = \"/srv/x:y\"\nread_only = true\n")]).unwrap();
    let mount = &s.mounts.value[0];
    assert_eq!((mount.host.as_path(), mount.guest.as_path(), mount.read_only), (Path::new("/data/a:b"), Path::new("/srv/x:y"), true));
}

#[test]
fn a_project_file_asking_more_of_the_host_than_the_defaults_needs_trust() {
    let path = Path::new("/p/.cvm.toml");
    let widening = |text: &str| -> Vec<&'static str> {
        parse_file(path, text).unwrap().widening(path, Path::new(HOME)).into_iter().map(|(k, _)| k).collect()
    };
    assert_eq!(
        widening("[vm]\ncpus = 4\nmemory = \"20G\"\ndisk = \"8T\"\ntimeout = \"9999h\"\n"),
        ["vm.cpus", "vm.disk", "vm.memory", "vm.timeout"]
    );
    assert!(widening("[vm]\ncpus = 2\nmemory = \"512M\"\ntimeout = \"10m\"\n").is_empty(), "the defaults, or less");
    assert!(widening("[vm]\ncpus = 1\nmemory = \"256M\"\ntimeout = \"1h\"\nvmm = \"qemu\"\n").is_empty());
    assert_eq!(widening("[vm]\ndisk = \"1G\"\n"), ["vm.disk"], "any disk is host disk");
}

#[test]
fn env_tables_merge_by_name_the_project_over_the_user() {
    let s = layered(&[
        ("/home/dev/.cvm.toml", "[env]\nANTHROPIC_BASE_URL = \"https://llm.corp.test\"\nEDITOR = \"vi\"\n"),
        ("/p/.cvm.toml", "[env]\nEDITOR = \"nano\"\nNODE_OPTIONS = \"--max-old-space-size=4096\"\n"),
    ])
    .unwrap();
    let env: Vec<(&str, &str)> = s.env.value.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    assert_eq!(env, [("ANTHROPIC_BASE_URL", "https://llm.corp.test"), ("EDITOR", "nano"), ("NODE_OPTIONS", "--max-old-space-size=4096")]);
    assert_eq!(s.env.sources, [Source::File("/home/dev/.cvm.toml".into()), Source::File("/p/.cvm.toml".into())]);
    let shown = s.show();
    assert!(shown.lines().any(|l| l.starts_with("env.EDITOR") && l.contains("\"nano\"")), "{shown}");
    assert!(Settings::defaults().show().lines().all(|l| !l.starts_with("env.")));
}

#[test]
fn durations() {
    use keys::parse_duration;
    assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    for bad in ["", "s", "0", "-1s", "1.5s", "10x", "1 s", "99999999999999999999999"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_configuration_file_cannot_set_what_cvm_sets() {
    assert!(check_configurable("ANTHROPIC_BASE_URL").is_ok());
    for name in ["CVM_VMM", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "HOME", "NODE_EXTRA_CA_CERTS", "SSH_AUTH_SOCK", "1X", "A-B"] {
        assert!(check_configurable(name).is_err(), "{name}");
    }
}
