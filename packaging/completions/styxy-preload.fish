# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_styxy_preload_global_optspecs
    string join \n h/help V/version
end

function __fish_styxy_preload_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_styxy_preload_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_styxy_preload_using_subcommand
    set -l cmd (__fish_styxy_preload_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -s V -l version -d 'Print version'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "exec" -d 'Run a command with coordinated ports'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "log" -d 'Show what the hooks did (remaps, pass-throughs, errors)'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "ports" -d 'List the coordinator\'s live allocations'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "port" -d 'Allocate (or look up) a port for a script: PORT=$(styxy-preload port 3000)'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "env" -d 'Print the environment that makes every process of a shell coordinated'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "status" -d 'Check the setup: library, coordinator, mode, log; exit non-zero when broken'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "stats" -d 'Numbers: remaps, pass-throughs and failures by type and session, range use'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "daemon" -d 'Run, start, stop or check the built-in coordinator daemon'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "supervise" -d 'Run PROGRAM under the seccomp supervisor (the library does this by itself for static and Go programs it cannot reach)'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "generate" -d 'Write shell completions (bash, zsh, fish) or man pages into DIR (for packagers)'
complete -c styxy-preload -n "__fish_styxy_preload_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand exec" -l session -d 'Join (or name) a session; default: the current STYXY_PRELOAD_SESSION, else a new one' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand exec" -l mode -d 'coordinate (default), on-conflict (ask only after EADDRINUSE), observe (never change a port) or fallback (a port another session holds fails with EADDRINUSE: for tools that move on by themselves; the default for those exec recognises)' -r -f -a "coordinate\t''
on-conflict\t''
observe\t''
fallback\t''"
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand exec" -l port -d 'Allocate before starting: NAME=TYPE, NAME=PORT or NAME (a dev port); exported as $NAME and substituted for {NAME} in arguments. `auto`: the variables the recognised tool reads (PORT, UVICORN_PORT, …)' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand exec" -s q -l quiet -d 'No summary line at the end'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand exec" -l no-start-daemon -d 'Do not start the built-in daemon when no coordinator answers (ports then pass through)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand exec" -l no-isolate -d 'Let connects reach other sessions\' servers (isolation off)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand exec" -l seccomp -d 'Answer the tree\'s bind/listen/connect from a seccomp filter (Linux): reaches static and Go programs, which LD_PRELOAD does not. On by itself when CMD is one of those'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand exec" -l no-seccomp -d 'Never use the seccomp filter, even for a static or Go CMD'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand exec" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand log" -l session -d 'Only this session' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand log" -l since -d 'Only events newer than this (e.g. 30s, 10m, 2h)' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand log" -s n -l lines -d 'Only the last N events' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand log" -l json -d 'JSON lines instead of a table'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand log" -s f -l follow -d 'Keep printing new events (survives log rotation)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand log" -l all -d 'Also the repeats of a start (the same process binding the same port again: a server\'s dual-stack twin, a probe then the real bind), which the table hides'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand log" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand ports" -l json -d 'JSON instead of a table'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand ports" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand port" -l session -d 'Session (default: STYXY_PRELOAD_SESSION)' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand port" -l type -d 'Service type (default: the type of REQUESTED, or dev)' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand port" -l json -d 'JSON with port, type, session and lock id'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand port" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand env" -l shell -r -f -a "bash\t''
zsh\t''
fish\t''"
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand env" -l session -d 'Session for everything started from this shell' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand env" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand status" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand stats" -l since -d 'Only events newer than this (e.g. 10m, 1h, 1d)' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand stats" -l session -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand stats" -l json
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand stats" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and not __fish_seen_subcommand_from run start stop status help" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and not __fish_seen_subcommand_from run start stop status help" -f -a "run" -d 'Run in the foreground'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and not __fish_seen_subcommand_from run start stop status help" -f -a "start" -d 'Start in the background; returns once the socket answers'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and not __fish_seen_subcommand_from run start stop status help" -f -a "stop" -d 'Stop the running daemon'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and not __fish_seen_subcommand_from run start stop status help" -f -a "status" -d 'Is it running, where, since when, how many allocations'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and not __fish_seen_subcommand_from run start stop status help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from run" -l http -d 'Also serve TCP (bearer token in the runtime directory\'s token file), e.g. 127.0.0.1:9877' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from run" -l idle-exit -d 'Exit after this many idle seconds while holding no allocation and no session\'s shell or exec runs (0: never)' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from run" -l upstream -d 'Front this Styxy: every grant becomes an allocation there, e.g. http://127.0.0.1:9876. Default: STYXY_URL when it is an http URL, else STYXY_DAEMON_HOST:STYXY_DAEMON_PORT (127.0.0.1:9876), whenever it answers; token from STYXY_TOKEN or ~/.styxy/auth.token' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from run" -l upstream-expiry -d 'Seconds after which Styxy forgets an allocation (live ones are re-asserted at 3/5 of it)' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from run" -l grace -d 'Seconds a session\'s freed mapping is kept for a restarting server' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from run" -l no-upstream -d 'Never talk to Styxy'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from run" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from start" -l http -d 'Also serve TCP (bearer token in the runtime directory\'s token file), e.g. 127.0.0.1:9877' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from start" -l idle-exit -d 'Exit after this many idle seconds while holding no allocation and no session\'s shell or exec runs (0: never)' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from start" -l upstream -d 'Front this Styxy: every grant becomes an allocation there, e.g. http://127.0.0.1:9876. Default: STYXY_URL when it is an http URL, else STYXY_DAEMON_HOST:STYXY_DAEMON_PORT (127.0.0.1:9876), whenever it answers; token from STYXY_TOKEN or ~/.styxy/auth.token' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from start" -l upstream-expiry -d 'Seconds after which Styxy forgets an allocation (live ones are re-asserted at 3/5 of it)' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from start" -l grace -d 'Seconds a session\'s freed mapping is kept for a restarting server' -r
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from start" -l no-upstream -d 'Never talk to Styxy'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from start" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from stop" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from status" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from help" -f -a "run" -d 'Run in the foreground'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from help" -f -a "start" -d 'Start in the background; returns once the socket answers'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from help" -f -a "stop" -d 'Stop the running daemon'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from help" -f -a "status" -d 'Is it running, where, since when, how many allocations'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand daemon; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand supervise" -s h -l help -d 'Print help'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand generate" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "exec" -d 'Run a command with coordinated ports'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "log" -d 'Show what the hooks did (remaps, pass-throughs, errors)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "ports" -d 'List the coordinator\'s live allocations'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "port" -d 'Allocate (or look up) a port for a script: PORT=$(styxy-preload port 3000)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "env" -d 'Print the environment that makes every process of a shell coordinated'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "status" -d 'Check the setup: library, coordinator, mode, log; exit non-zero when broken'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "stats" -d 'Numbers: remaps, pass-throughs and failures by type and session, range use'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "daemon" -d 'Run, start, stop or check the built-in coordinator daemon'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "supervise" -d 'Run PROGRAM under the seccomp supervisor (the library does this by itself for static and Go programs it cannot reach)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "generate" -d 'Write shell completions (bash, zsh, fish) or man pages into DIR (for packagers)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and not __fish_seen_subcommand_from exec log ports port env status stats daemon supervise generate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and __fish_seen_subcommand_from daemon" -f -a "run" -d 'Run in the foreground'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and __fish_seen_subcommand_from daemon" -f -a "start" -d 'Start in the background; returns once the socket answers'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and __fish_seen_subcommand_from daemon" -f -a "stop" -d 'Stop the running daemon'
complete -c styxy-preload -n "__fish_styxy_preload_using_subcommand help; and __fish_seen_subcommand_from daemon" -f -a "status" -d 'Is it running, where, since when, how many allocations'
