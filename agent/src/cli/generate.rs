//! `precedent completions SHELL` and `precedent manpage`: generated from the clap definitions
//! in main.rs, so they always match the parser. The .deb ships both (see `cargo xtask package`).
use std::io::Write;

use clap::Args;
use clap_complete::Shell;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: Shell,
}

/// Writes `shell`'s completion script for `cmd` to `out`.
pub fn completions(shell: Shell, cmd: &mut clap::Command, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, cmd, name, out);
}

/// Writes the roff man page (section 8: a system administration command) for `cmd` to `out`.
pub fn manpage(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    let title = cmd.get_name().to_uppercase();
    clap_mangen::Man::new(cmd)
        .title(title)
        .section("8")
        .manual("System Administration")
        .render(out)
}
