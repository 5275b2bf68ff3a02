//! Shell completions and man pages, generated from the CLI definition, and
//! the hidden `__complete` helper the bash completion calls for image and
//! node names.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;

use crate::app::cli::Cli;

/// Completion of image names after `-i` and node names in place of NODES,
/// on top of clap's generated `_imaging` (bash).
const BASH_DYNAMIC: &str = r#"
# Image names after -i, node names for NODES: asked of `imaging __complete`.
_imaging_dynamic() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local prog="${COMP_WORDS[0]##*/}" sub="${COMP_WORDS[1]}"
    case "$prog" in imaging-*) sub="${prog#imaging-}" ;; esac
    case "$prev" in
        -i|--image)
            COMPREPLY=($(compgen -W "$(imaging __complete images 2>/dev/null)" -- "$cur"))
            return ;;
    esac
    case "$sub" in
        load|save|wait|nodes|status|clean)
            if [[ "$cur" != -* && ( "$prog" == imaging-* || $COMP_CWORD -ge 2 ) ]]; then
                COMPREPLY=($(compgen -W "$(imaging __complete nodes 2>/dev/null)" -- "$cur"))
                return
            fi ;;
    esac
    if [[ "$prog" == imaging-* ]]; then
        COMP_WORDS=(imaging "$sub" "${COMP_WORDS[@]:1}")
        COMP_CWORD=$((COMP_CWORD + 1))
    fi
    _imaging "$@"
}
complete -F _imaging_dynamic -o bashdefault -o default imaging imaging-load imaging-save imaging-wait imaging-list imaging-nodes imaging-config imaging-status imaging-clean
"#;

pub fn completions(shell: clap_complete::Shell, out: &mut impl Write) -> std::io::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "imaging", out);
    if shell == clap_complete::Shell::Bash {
        out.write_all(BASH_DYNAMIC.as_bytes())?;
    }
    Ok(())
}

/// `imaging.1` and one `imaging-<command>.1` per visible subcommand.
pub fn man_pages(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let cmd = Cli::command();
    let mut written = Vec::new();
    let mut page = |cmd: clap::Command, name: String| -> std::io::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.name(name.clone())).render(&mut buf)?;
        std::fs::write(&path, buf)?;
        written.push(path);
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("imaging-{}", sub.get_name());
        page(sub.clone(), name)?;
    }
    page(cmd, "imaging".into())?;
    Ok(written)
}
