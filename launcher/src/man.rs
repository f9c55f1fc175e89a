//! The man pages in docs/man/, rendered from the clap definitions of `vdaq` and
//! `vhost-device-daq` (one page per command and subcommand). A test keeps them current:
//! `VDAQ_UPDATE_MAN=1 cargo test -p vdaq-launcher man_pages` writes them.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use clap::CommandFactory;

    /// Every page of `command` and its subcommands: (file name, roff).
    fn pages(command: clap::Command) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let name = command.get_name().to_string();
        let mut roff = Vec::new();
        clap_mangen::Man::new(command.clone())
            .render(&mut roff)
            .expect("rendered");
        out.push((format!("{name}.1"), roff));
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
            let sub = sub.clone().name(format!("{name}-{}", sub.get_name()));
            out.extend(pages(sub));
        }
        out
    }

    fn man_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/man")
    }

    #[test]
    fn man_pages_are_current() {
        let mut all = pages(crate::args::Cli::command().name("vdaq"));
        all.extend(pages(
            vhost_device_daq::cli::command().name("vhost-device-daq"),
        ));
        let dir = man_dir();
        if std::env::var_os("VDAQ_UPDATE_MAN").is_some() {
            std::fs::create_dir_all(&dir).expect("docs/man");
            for (file, roff) in &all {
                std::fs::write(dir.join(file), roff).expect("written");
            }
        }
        for (file, roff) in &all {
            let current = std::fs::read(dir.join(file)).unwrap_or_default();
            assert!(
                current == *roff,
                "docs/man/{file} is not current: run VDAQ_UPDATE_MAN=1 cargo test -p \
                 vdaq-launcher man_pages"
            );
        }
        // Nothing stale beside them.
        let expected: Vec<&str> = all.iter().map(|(f, _)| f.as_str()).collect();
        for entry in std::fs::read_dir(&dir).expect("docs/man") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            assert!(
                expected.contains(&name.as_str()),
                "docs/man/{name} belongs to no command"
            );
        }
        assert!(expected.contains(&"vdaq-bench.1"));
    }
}
