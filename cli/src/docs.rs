//! Man pages (`clap_mangen`) and shell completions (`clap_complete`) generated from the real
//! command-line definitions, so they say what the flags are. `enlight generate-docs --out DIR`
//! and `enlightd --generate-docs DIR` (both hidden) write them for the Debian package
//! (`packaging/build-deb.sh`): `DIR/man/<name>.<section>` (one page per subcommand too) and
//! `DIR/completions/{<name>.bash,_<name>,<name>.fish}`.

use std::path::Path;

/// Writes `cmd`'s man pages in `section` and its bash, zsh and fish completions under `dir`.
pub fn write(mut cmd: clap::Command, dir: &Path, section: &str) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    if section == "1" {
        // One page for the command and one for each of its (visible) subcommands.
        clap_mangen::generate_to(cmd.clone(), &man)?;
    } else {
        clap_mangen::Man::new(cmd.clone())
            .section(section)
            .generate_to(&man)?;
    }
    let name = cmd.get_name().to_string();
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_come_from_the_definitions() {
        let cmd = clap::Command::new("tool")
            .about("does things")
            .arg(clap::Arg::new("level").long("level").help("how much"))
            .subcommand(clap::Command::new("run").about("runs"));
        let dir = tempfile::tempdir().unwrap();
        write(cmd, dir.path(), "1").unwrap();
        let page = std::fs::read_to_string(dir.path().join("man/tool.1")).unwrap();
        assert!(
            page.contains("does things") && page.contains("level"),
            "{page}"
        );
        assert!(dir.path().join("man/tool-run.1").exists());
        let bash = std::fs::read_to_string(dir.path().join("completions/tool.bash")).unwrap();
        assert!(bash.contains("--level"), "{bash}");
        assert!(dir.path().join("completions/_tool").exists());
        assert!(dir.path().join("completions/tool.fish").exists());
    }
}
