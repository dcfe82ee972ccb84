//! Host lists users already keep: MPI/DeepSpeed hostfiles, Ansible INI
//! inventories, and any other Ansible inventory (YAML, scripts, plugins) as
//! `ansible-inventory --list` prints it, read into the entries of
//! `[cluster]` (see `docs/job-file.md`).
//!
//! Written by hand: no well-kept crate parses Ansible's INI dialect (host
//! lines with `key=value` pairs, `[group:vars]`, `[group:children]`, host
//! ranges such as `node[01:04]`), and a hostfile is a few lines of text.
//! Other inventory formats are left to Ansible itself, whose JSON output
//! has every host's variables already resolved.
//! Both parsers only read; turning an entry into a host (its address, its
//! roles) is `spec/cluster.rs`'s job, so the rules stay in one place.

use std::collections::{BTreeMap, BTreeSet};

/// One host as a host list describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// The name the list gives it (inventory hostname or hostfile host).
    pub name: String,
    /// 1-based line of the list where the host appears first.
    pub line: usize,
    /// How to reach it over SSH (`host`, `user@host` or `ssh://user@host:port`).
    pub ssh: String,
    /// The address the list gives for peers, if any (a host name or IP).
    pub address: Option<String>,
    /// Workers: a hostfile's `slots`, an inventory's `warden_workers`.
    pub workers: Option<u32>,
    /// Servers (`servers=` / `warden_servers`).
    pub servers: Option<u32>,
    /// Scheduler (`scheduler=` / `warden_scheduler`), 0 or 1.
    pub scheduler: Option<u32>,
    /// SSH private key (`ansible_ssh_private_key_file`).
    pub identity_file: Option<String>,
}

/// A problem in a host list, at a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: String,
}

fn fail<T>(line: usize, message: impl Into<String>, help: impl Into<String>) -> Result<T, ListError> {
    Err(ListError { line, message: message.into(), help: help.into() })
}

fn count(line: usize, key: &str, value: &str, hi: u32) -> Result<u32, ListError> {
    match value.parse::<u32>() {
        Ok(n) if n <= hi => Ok(n),
        _ => {
            fail(line, format!("`{key}={value}` is not a whole number from 0 to {hi}"), format!("for example {key}=1"))
        }
    }
}

/// Reads an MPI/DeepSpeed-style hostfile: one host per line, `host slots=N`
/// (Open MPI, DeepSpeed) or `host:N` (MPICH), `#` comments. The slots
/// (default 1) are the host's workers; warden also reads `servers=N`,
/// `scheduler=1` and `address=IP`; `max_slots` is accepted and ignored
/// (warden never oversubscribes).
pub fn parse_hostfile(text: &str) -> Result<Vec<Entry>, ListError> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let mut words = content.split_whitespace();
        let first = words.next().unwrap_or_default();
        // MPICH's `host:N`; one colon only, so an IPv6 address is left alone.
        let (host, mpich_slots) = match first.split_once(':') {
            Some((h, n)) if !n.contains(':') => (h, Some(count(line, "slots", n, 1024)?)),
            _ => (first, None),
        };
        let name = host.rsplit('@').next().unwrap_or(host).to_string();
        if name.is_empty() || host.contains('=') {
            return fail(
                line,
                format!("`{content}` does not start with a host"),
                "write one host per line: node1 slots=2",
            );
        }
        let mut e = Entry { name, line, ssh: host.to_string(), workers: mpich_slots, ..Entry::default() };
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                return fail(line, format!("`{word}` is not key=value"), "for example: node1 slots=2");
            };
            match key {
                "slots" if mpich_slots.is_some() => {
                    return fail(
                        line,
                        format!("`{first}` and `{word}` both give the slots"),
                        "write one: node1:2 or node1 slots=2",
                    );
                }
                "slots" => e.workers = Some(count(line, key, value, 1024)?),
                "max_slots" => {
                    count(line, key, value, u32::MAX)?;
                }
                "servers" => e.servers = Some(count(line, key, value, 256)?),
                "scheduler" => e.scheduler = Some(count(line, key, value, 1)?),
                "address" => e.address = Some(value.to_string()),
                other => {
                    return fail(
                        line,
                        format!("unknown hostfile key `{other}`"),
                        "a hostfile line takes slots=, max_slots=, servers=, scheduler= and address=",
                    );
                }
            }
        }
        if let Some(first) = entries.iter().find(|x| x.name == e.name) {
            return fail(
                line,
                format!("host `{}` is listed twice (first on line {})", e.name, first.line),
                "list each host once; give it more slots instead",
            );
        }
        entries.push(e);
    }
    Ok(entries)
}

/// Splits an inventory line into words the way Ansible's INI reader does
/// (shell-like: quotes group, `#` starts a comment at a word boundary).
fn words(line: usize, text: &str) -> Result<Vec<String>, ListError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '#' if !in_word => break,
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '"' | '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some('\\') if c == '"' => cur.extend(chars.next()),
                        Some(x) => cur.push(x),
                        None => return fail(line, "unterminated quote", "close the quote on the same line"),
                    }
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// Expands one Ansible host pattern: `node[01:03]` is node01, node02,
/// node03; `db-[a:c]` is db-a, db-b, db-c; `[0:10:5]` takes a stride.
fn expand(line: usize, pattern: &str) -> Result<Vec<String>, ListError> {
    let Some(open) = pattern.find('[') else { return Ok(vec![pattern.to_string()]) };
    let Some(close) = pattern[open..].find(']').map(|c| open + c) else {
        return fail(line, format!("`{pattern}` opens a range without closing it"), "for example node[01:04]");
    };
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let parts: Vec<&str> = body.split(':').collect();
    let bad = || {
        fail(
            line,
            format!("`[{body}]` is not a host range"),
            "write [first:last] or [first:last:stride], e.g. node[01:04]",
        )
    };
    if !(2..=3).contains(&parts.len()) {
        return bad();
    }
    let stride: usize = match parts.get(2) {
        Some(s) => match s.parse() {
            Ok(n) if n > 0 => n,
            _ => return bad(),
        },
        None => 1,
    };
    let mut names = Vec::new();
    let (a, b) = (parts[0], parts[1]);
    if let (Ok(x), Ok(y)) = (a.parse::<u64>(), b.parse::<u64>()) {
        // Leading zeros set the width, as in Ansible.
        let width = if a.len() > 1 && a.starts_with('0') { a.len() } else { 0 };
        if y < x || (y - x) / stride as u64 >= 4096 {
            return fail(line, format!("`[{body}]` is empty or over 4096 hosts"), "write the lower bound first");
        }
        for n in (x..=y).step_by(stride) {
            names.push(format!("{head}{n:0width$}"));
        }
    } else if let ([x], [y]) = (a.as_bytes(), b.as_bytes()) {
        if !(x.is_ascii_alphabetic() && y.is_ascii_alphabetic()) || y < x {
            return bad();
        }
        for c in (*x..=*y).step_by(stride) {
            names.push(format!("{head}{}", c as char));
        }
    } else {
        return bad();
    }
    let rests = expand(line, tail)?;
    if names.len() * rests.len() > 4096 {
        return fail(line, format!("`{pattern}` names over 4096 hosts"), "split it into smaller ranges");
    }
    Ok(names.iter().flat_map(|n| rests.iter().map(move |r| format!("{n}{r}"))).collect())
}

#[derive(Default)]
struct Group {
    hosts: Vec<String>,
    children: Vec<String>,
    vars: BTreeMap<String, String>,
    line: usize,
}

/// What the lines under a header are: host lines, `key=value` lines or
/// child group names, of the named group.
enum Section {
    Hosts(String),
    Vars(String),
    Children(String),
}

/// An inventory as written: its groups and its hosts, before variables are
/// resolved.
struct Inventory {
    groups: BTreeMap<String, Group>,
    /// Host -> (first line, own vars), in file order.
    hosts: Vec<(String, usize, BTreeMap<String, String>)>,
}

/// Reads an Ansible INI inventory and returns the hosts of `group` (every
/// host when `None`; `all` works too), in file order.
///
/// Variables apply as in Ansible: a host line's own `key=value` pairs win
/// over the vars of the groups it sits in, which win over their parent
/// groups' and `[all:vars]`. Read: `ansible_host`, `ansible_port`,
/// `ansible_user` (and their `ansible_ssh_` forms),
/// `ansible_ssh_private_key_file`, and `warden_address`, `warden_workers`,
/// `warden_servers`, `warden_scheduler`. Other variables are Ansible's own
/// and are left to it (SSH options come from `[cluster] ssh_config` or
/// `~/.ssh/config`).
pub fn parse_inventory(text: &str, group: Option<&str>) -> Result<Vec<Entry>, ListError> {
    Inventory::read(text)?.entries(group)
}

/// Whether an inventory file is one only Ansible can read: YAML (by its
/// name or its first line) or JSON; an executable (a dynamic inventory
/// script) is checked by the caller.
pub fn needs_ansible(path: &std::path::Path, text: &str) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    if matches!(ext, "yml" | "yaml" | "json") {
        return true;
    }
    let first = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'));
    first.is_some_and(|l| l == "---" || l.starts_with('{') || (l.ends_with(':') && !l.starts_with('[')))
}

/// Reads the output of `ansible-inventory --list` (hosts and variables as
/// Ansible resolved them, from any inventory source) and returns the hosts
/// of `group` (every host when `None` or `all`), in the order Ansible lists
/// them. Variables are read as [`parse_inventory`] reads them.
pub fn parse_inventory_json(json: &str, group: Option<&str>) -> Result<Vec<Entry>, ListError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| ListError {
        line: 1,
        message: format!("ansible-inventory printed no inventory: {e}"),
        help: "run `ansible-inventory -i FILE --list` and fix what it reports".into(),
    })?;
    let want = group.unwrap_or("all");
    if v.get(want).is_none() {
        let known: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).filter(|k| !k.starts_with('_') && *k != "ungrouped").collect())
            .unwrap_or_default();
        return fail(1, format!("the inventory has no group `{want}`"), format!("its groups: {}", known.join(", ")));
    }
    // Hosts of the group and, depth first, of its children, each once.
    let (mut names, mut seen, mut stack) = (Vec::<String>::new(), BTreeSet::new(), vec![want.to_string()]);
    let mut groups_seen = BTreeSet::new();
    while let Some(g) = stack.pop() {
        if !groups_seen.insert(g.clone()) {
            continue;
        }
        let list = |key: &str| -> Vec<String> {
            v[&g][key]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        for h in list("hosts") {
            if seen.insert(h.clone()) {
                names.push(h);
            }
        }
        stack.extend(list("children").into_iter().rev());
    }
    if names.is_empty() {
        return fail(1, format!("the inventory lists no host in `{want}`"), "add hosts to the group");
    }
    names
        .iter()
        .map(|name| {
            let vars: BTreeMap<String, String> = v["_meta"]["hostvars"][name]
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, x)| {
                            let text = match x {
                                serde_json::Value::String(s) => s.clone(),
                                serde_json::Value::Number(n) => n.to_string(),
                                serde_json::Value::Bool(b) => b.to_string(),
                                _ => return None,
                            };
                            Some((k.clone(), text))
                        })
                        .collect()
                })
                .unwrap_or_default();
            // `--list` leaves Jinja templates unexpanded: a literal
            // `{{ ... }}` is no address, user or port.
            if let Some((key, value)) =
                vars.iter().find(|(k, v)| (k.starts_with("ansible_") || k.starts_with("warden_")) && v.contains("{{"))
            {
                return fail(
                    1,
                    format!("host `{name}`: {key} = {value} is a template, which ansible-inventory does not expand"),
                    "give warden's hosts literal values (or an INI inventory)",
                );
            }
            entry_from_vars(name, 1, &vars)
        })
        .collect()
}

impl Inventory {
    /// Reads every line into groups and hosts, and checks that each child
    /// group named exists.
    fn read(text: &str) -> Result<Self, ListError> {
        let mut inventory = Inventory { groups: BTreeMap::new(), hosts: Vec::new() };
        // Hosts above the first header are in Ansible's `ungrouped`.
        inventory.groups.insert("ungrouped".into(), Group { line: 1, ..Group::default() });
        let mut section = Section::Hosts("ungrouped".into());
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            if let Some(head) = trimmed.strip_prefix('[') {
                section = inventory.open_section(line, trimmed, head)?;
                continue;
            }
            let w = words(line, trimmed)?;
            if w.is_empty() {
                continue;
            }
            match &section {
                Section::Vars(g) => inventory.add_var(line, g, trimmed)?,
                Section::Children(g) => inventory.add_child(line, g, trimmed, &w)?,
                Section::Hosts(g) => inventory.add_hosts(line, g, &w)?,
            }
        }
        inventory.check_children()?;
        Ok(inventory)
    }

    /// Reads a `[group]`, `[group:vars]` or `[group:children]` header
    /// (`head` is the text after `[`) and creates the group if it is new.
    fn open_section(&mut self, line: usize, trimmed: &str, head: &str) -> Result<Section, ListError> {
        let Some(head) = head.strip_suffix(']') else {
            return fail(
                line,
                format!("`{trimmed}` is not a section header"),
                "write [group], [group:vars] or [group:children]",
            );
        };
        let (name, kind) = head.split_once(':').unwrap_or((head, ""));
        if name.is_empty() || name.contains(char::is_whitespace) {
            return fail(line, format!("`{head}` is not a group name"), "group names have no spaces");
        }
        self.groups.entry(name.to_string()).or_insert_with(|| Group { line, ..Group::default() });
        match kind {
            "" => Ok(Section::Hosts(name.into())),
            "vars" => Ok(Section::Vars(name.into())),
            "children" => Ok(Section::Children(name.into())),
            other => {
                fail(line, format!("unknown section kind `:{other}`"), "use [group], [group:vars] or [group:children]")
            }
        }
    }

    fn group_mut(&mut self, name: &str) -> &mut Group {
        self.groups.get_mut(name).expect("section's group exists")
    }

    /// A `[group:vars]` line: `key=value`, the value read as words.
    fn add_var(&mut self, line: usize, group: &str, trimmed: &str) -> Result<(), ListError> {
        let joined = trimmed.split_once('=');
        let Some((key, _)) = joined else {
            return fail(line, format!("`{trimmed}` is not key=value"), "a [group:vars] line is key=value");
        };
        let value = words(line, &trimmed[key.len() + 1..])?.join(" ");
        self.group_mut(group).vars.insert(key.trim().to_string(), value);
        Ok(())
    }

    /// A `[group:children]` line: one group name.
    fn add_child(&mut self, line: usize, group: &str, trimmed: &str, w: &[String]) -> Result<(), ListError> {
        if w.len() != 1 {
            return fail(line, format!("`{trimmed}` is not a group name"), "a [group:children] line names one group");
        }
        self.group_mut(group).children.push(w[0].clone());
        Ok(())
    }

    /// A host line: a host pattern, then its own `key=value` pairs. A host
    /// listed again keeps its first line and gains the new pairs.
    fn add_hosts(&mut self, line: usize, group: &str, w: &[String]) -> Result<(), ListError> {
        let mut vars = BTreeMap::new();
        for word in &w[1..] {
            let Some((k, v)) = word.split_once('=') else {
                return fail(
                    line,
                    format!("`{word}` is not key=value"),
                    "host variables are key=value, e.g. ansible_host=10.0.0.5",
                );
            };
            vars.insert(k.to_string(), v.to_string());
        }
        let expanded = expand(line, &w[0])?;
        if self.hosts.len() + expanded.len() > 4096 {
            return fail(line, "the inventory lists more than 4096 hosts", "a job runs on at most 4096 hosts");
        }
        for name in expanded {
            match self.hosts.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, _, own)) => own.extend(vars.clone()),
                None => self.hosts.push((name.clone(), line, vars.clone())),
            }
            let members = &mut self.group_mut(group).hosts;
            if !members.contains(&name) {
                members.push(name);
            }
        }
        Ok(())
    }

    fn check_children(&self) -> Result<(), ListError> {
        for (name, g) in &self.groups {
            if let Some(missing) = g.children.iter().find(|c| !self.groups.contains_key(c.as_str())) {
                return fail(
                    g.line,
                    format!("group `{name}` names a child group `{missing}` that does not exist"),
                    "define the group or remove the line",
                );
            }
        }
        Ok(())
    }

    /// The hosts of `group` (all when `None` or `all`) with their variables
    /// resolved, in file order.
    fn entries(&self, group: Option<&str>) -> Result<Vec<Entry>, ListError> {
        let parents = self.parents();
        let wanted = group.filter(|g| *g != "all");
        if let Some(g) = wanted.filter(|g| !self.groups.contains_key(*g)) {
            let known: Vec<&str> = self.groups.keys().map(String::as_str).filter(|k| *k != "ungrouped").collect();
            return fail(1, format!("the inventory has no group `{g}`"), format!("its groups: {}", known.join(", ")));
        }
        let mut out = Vec::new();
        for (name, line, own) in &self.hosts {
            if wanted.is_some_and(|g| !self.contains(g, name)) {
                continue;
            }
            out.push(entry_from_vars(name, *line, &self.vars_of(name, own, &parents))?);
        }
        if out.is_empty() {
            return fail(
                1,
                format!("the inventory lists no host{}", group.map(|g| format!(" in `{g}`")).unwrap_or_default()),
                "add host lines under a [group] header",
            );
        }
        Ok(out)
    }

    /// Each group's parents, from the `[group:children]` sections.
    fn parents(&self) -> BTreeMap<&str, Vec<&str>> {
        self.groups.iter().fold(BTreeMap::new(), |mut m, (name, g)| {
            for c in &g.children {
                m.entry(c.as_str()).or_default().push(name.as_str());
            }
            m
        })
    }

    /// Whether `host` belongs to `group`, directly or through children.
    fn contains(&self, group: &str, host: &str) -> bool {
        let (mut stack, mut seen) = (vec![group], BTreeSet::new());
        while let Some(g) = stack.pop() {
            if !seen.insert(g) {
                continue;
            }
            if let Some(gr) = self.groups.get(g) {
                if gr.hosts.iter().any(|h| h == host) {
                    return true;
                }
                stack.extend(gr.children.iter().map(String::as_str));
            }
        }
        false
    }

    /// A host's variables: all:vars, then groups from the farthest to the
    /// nearest, then the host's own.
    fn vars_of(
        &self,
        name: &str,
        own: &BTreeMap<String, String>,
        parents: &BTreeMap<&str, Vec<&str>>,
    ) -> BTreeMap<String, String> {
        let mut vars: BTreeMap<String, String> = self.groups.get("all").map(|g| g.vars.clone()).unwrap_or_default();
        let mut mine: Vec<&str> =
            self.groups.keys().map(String::as_str).filter(|g| *g != "all" && self.contains(g, name)).collect();
        mine.sort_by_key(|g| (depth(g, parents, &mut Vec::new()), *g));
        for g in mine {
            vars.extend(self.groups[g].vars.clone());
        }
        vars.extend(own.clone());
        vars
    }
}

/// Depth of a group below `all` (the longest chain of parents, as Ansible
/// counts it), so that nearer groups' vars win.
fn depth<'a>(g: &'a str, parents: &BTreeMap<&'a str, Vec<&'a str>>, path: &mut Vec<&'a str>) -> usize {
    if path.contains(&g) {
        return 0; // a cycle: Ansible refuses it, here it just stops counting
    }
    path.push(g);
    let d = parents.get(g).map_or(0, |ps| ps.iter().map(|p| 1 + depth(p, parents, path)).max().unwrap_or(0));
    path.pop();
    d
}

fn entry_from_vars(name: &str, line: usize, vars: &BTreeMap<String, String>) -> Result<Entry, ListError> {
    let get = |keys: &[&str]| keys.iter().find_map(|k| vars.get(*k)).cloned();
    let host = get(&["ansible_host", "ansible_ssh_host"]).unwrap_or_else(|| name.to_string());
    let user = get(&["ansible_user", "ansible_ssh_user"]);
    let port = match get(&["ansible_port", "ansible_ssh_port"]) {
        Some(p) => Some(count(line, "ansible_port", &p, 65535)?),
        None => None,
    };
    let bracketed = if host.contains(':') { format!("[{host}]") } else { host.clone() };
    let ssh = match (&user, port) {
        (_, Some(p)) => format!("ssh://{}{bracketed}:{p}", user.as_ref().map(|u| format!("{u}@")).unwrap_or_default()),
        (Some(u), None) => format!("{u}@{host}"),
        (None, None) => host.clone(),
    };
    let num = |key: &str, hi: u32| -> Result<Option<u32>, ListError> {
        vars.get(key).map(|v| count(line, key, v, hi)).transpose()
    };
    Ok(Entry {
        name: name.to_string(),
        line,
        ssh,
        address: Some(get(&["warden_address"]).unwrap_or(host)),
        workers: num("warden_workers", 1024)?,
        servers: num("warden_servers", 256)?,
        scheduler: num("warden_scheduler", 1)?,
        identity_file: get(&["ansible_ssh_private_key_file", "ansible_private_key_file"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfiles_give_slots_as_workers_and_take_warden_keys() {
        let text = "# lab\nnode1 slots=4 max_slots=8\n\n  lab@node2   slots=2 servers=2 # big one\n10.0.0.7 scheduler=1 address=10.0.0.7\n";
        let e = parse_hostfile(text).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!((e[0].name.as_str(), e[0].ssh.as_str(), e[0].workers, e[0].line), ("node1", "node1", Some(4), 2));
        assert_eq!((e[1].name.as_str(), e[1].ssh.as_str(), e[1].servers), ("node2", "lab@node2", Some(2)));
        assert_eq!((e[2].scheduler, e[2].address.as_deref(), e[2].workers), (Some(1), Some("10.0.0.7"), None));
    }

    #[test]
    fn mpich_hostfiles_give_slots_after_a_colon() {
        let e = parse_hostfile(
            "10.0.0.11:2
lab@node2:1 servers=1
fe80::1
",
        )
        .unwrap();
        assert_eq!((e[0].name.as_str(), e[0].workers), ("10.0.0.11", Some(2)));
        assert_eq!(
            (e[1].name.as_str(), e[1].ssh.as_str(), e[1].workers, e[1].servers),
            ("node2", "lab@node2", Some(1), Some(1))
        );
        // An IPv6 address is a host, not host:N.
        assert_eq!((e[2].name.as_str(), e[2].workers), ("fe80::1", None));
        for (text, needle) in [("a:x\n", "not a whole number"), ("a:2 slots=2\n", "both give the slots")] {
            let err = parse_hostfile(text).unwrap_err();
            assert!(err.message.contains(needle), "{text:?}: {err:?}");
        }
    }

    #[test]
    fn hostfile_mistakes_name_their_line() {
        for (text, line, needle) in [
            ("a slots=2\nb slots=x\n", 2, "not a whole number"),
            ("a slots=2\na\n", 2, "listed twice"),
            ("a gpus=2\n", 1, "unknown hostfile key"),
            ("a slots\n", 1, "not key=value"),
            ("slots=2\n", 1, "does not start with a host"),
            ("a scheduler=2\n", 1, "0 to 1"),
        ] {
            let e = parse_hostfile(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e:?}");
            assert!(e.message.contains(needle), "{text:?}: {e:?}");
        }
    }

    const INVENTORY: &str = r#"
loose ansible_host=10.9.9.9

[web]
web[01:03].lab ansible_user=deploy

[gpu]
g-[a:b] warden_workers=4
big ansible_host=10.0.0.50 ansible_port=2222 ansible_user="ops" warden_servers=2 # comment

[gpu:vars]
ansible_user=trainer
ansible_ssh_private_key_file=~/.ssh/lab key

[lab:children]
gpu
web

[lab:vars]
ansible_user=labuser
warden_workers=1

[all:vars]
ansible_port=22
"#;

    /// `ansible-inventory --list` output: groups by children, variables
    /// resolved per host (numbers as numbers).
    const LISTED: &str = r#"{
        "_meta": {"hostvars": {
            "a": {"ansible_host": "10.0.0.1", "ansible_port": 2222, "ansible_user": "ops", "warden_workers": 2},
            "b": {"ansible_host": "10.0.0.2", "warden_scheduler": 1},
            "c": {}
        }},
        "all": {"children": ["ungrouped", "lab"]},
        "lab": {"children": ["gpu"], "hosts": ["b"]},
        "gpu": {"hosts": ["a"]},
        "ungrouped": {"hosts": ["c"]}
    }"#;

    #[test]
    fn ansible_inventory_json_gives_hosts_of_a_group_with_their_variables() {
        let all = parse_inventory_json(LISTED, None).unwrap();
        assert_eq!(all.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["c", "b", "a"]);
        let lab = parse_inventory_json(LISTED, Some("lab")).unwrap();
        assert_eq!(lab.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        let a = &lab[1];
        assert_eq!(
            (a.ssh.as_str(), a.workers, a.address.as_deref()),
            ("ssh://ops@10.0.0.1:2222", Some(2), Some("10.0.0.1"))
        );
        assert_eq!(lab[0].scheduler, Some(1));
        let e = parse_inventory_json(LISTED, Some("cpu")).unwrap_err();
        assert!(e.message.contains("no group `cpu`") && e.help.contains("gpu"), "{e:?}");
        assert!(parse_inventory_json("not json", None).unwrap_err().message.contains("ansible-inventory"));
        let templated = LISTED.replace("\"10.0.0.2\"", "\"{{ lookup('env', 'IP') }}\"");
        let e = parse_inventory_json(&templated, Some("lab")).unwrap_err();
        assert!(e.message.contains("host `b`: ansible_host") && e.message.contains("template"), "{e:?}");
    }

    #[test]
    fn yaml_json_and_ini_inventories_are_told_apart() {
        let p = std::path::Path::new;
        assert!(needs_ansible(p("hosts.yml"), "[lab]\n"));
        assert!(needs_ansible(p("hosts"), "# lab\nall:\n  hosts:\n"));
        assert!(needs_ansible(p("hosts"), "---\nall:\n"));
        assert!(!needs_ansible(p("hosts.ini"), "[lab]\nnode1 ansible_host=10.0.0.1\n"));
        assert!(!needs_ansible(p("hosts"), "node1\n"));
    }

    #[test]
    fn inventories_expand_ranges_and_apply_vars_nearest_first() {
        let all = parse_inventory(INVENTORY, None).unwrap();
        let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["loose", "web01.lab", "web02.lab", "web03.lab", "g-a", "g-b", "big"]);
        let lab = parse_inventory(INVENTORY, Some("lab")).unwrap();
        assert_eq!(lab.len(), 6, "children count as members");
        let by = |n: &str| lab.iter().find(|e| e.name == n).unwrap().clone();
        // Host vars beat group vars, which beat parents' and all:vars.
        assert_eq!(by("web02.lab").ssh, "ssh://deploy@web02.lab:22");
        assert_eq!(by("web02.lab").workers, Some(1));
        assert_eq!(by("g-a").ssh, "ssh://trainer@g-a:22");
        assert_eq!(by("g-a").workers, Some(4));
        assert_eq!(by("g-a").identity_file.as_deref(), Some("~/.ssh/lab key"));
        let big = by("big");
        assert_eq!(
            (big.ssh.as_str(), big.address.as_deref(), big.servers),
            ("ssh://ops@10.0.0.50:2222", Some("10.0.0.50"), Some(2))
        );
        assert_eq!(big.line, 9);
        assert_eq!(parse_inventory(INVENTORY, Some("gpu")).unwrap().len(), 3);
        assert_eq!(parse_inventory(INVENTORY, Some("all")).unwrap().len(), 7);
    }

    #[test]
    fn the_example_inventory_of_the_playbooks_reads() {
        let text = include_str!("../../../playbooks/inventory.example.ini");
        let e = parse_inventory(text, Some("warden_nodes")).unwrap();
        assert_eq!(e.iter().map(|e| e.ssh.as_str()).collect::<Vec<_>>(), ["admin@10.0.0.11", "admin@10.0.0.12"]);
    }

    #[test]
    fn inventory_mistakes_name_their_line() {
        for (text, group, line, needle) in [
            ("[a]\nh x\n", None, 2, "not key=value"),
            ("[a\nh\n", None, 1, "not a section header"),
            ("[a:kids]\n", None, 1, "unknown section kind"),
            ("[a]\nh[3:1]\n", None, 2, "empty"),
            ("[a]\nh[1:2\n", None, 2, "without closing"),
            ("[a]\nh[0:999]-[0:999]\n", None, 2, "names over 4096 hosts"),
            ("[a]\nh[0:3000]\ng[0:3000]\n", None, 3, "more than 4096 hosts"),
            ("[a]\nh ansible_port=99999\n", None, 2, "0 to 65535"),
            ("[a:children]\nb\n", None, 1, "does not exist"),
            ("[a]\nh\n", Some("b"), 1, "no group `b`"),
            ("[a]\n", None, 1, "no host"),
            ("[a]\nh ansible_user='x\n", None, 2, "unterminated"),
        ] {
            let e = parse_inventory(text, group).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e:?}");
            assert!(e.message.contains(needle), "{text:?}: {e:?}");
        }
    }
}
