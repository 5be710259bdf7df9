//! Offline checks of everything under `deploy/`: the ARM template and its parameters, the
//! cloud-init files (YAML, the scripts they install through `shellcheck`, the sshd fragments
//! through `sshd -t`, the gateway config through `poolgate check-config`), the systemd unit
//! (`systemd-analyze verify` plus the directives the gateway relies on), the Prometheus scrape
//! config and alert rules (`promtool check config`, `check rules`, `test rules`), and the
//! Grafana dashboard — whose every `poolgate_*` name, like those of the alert rules, must be
//! exported by a live gateway's `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use poolgate_tests::*;
use serde_json::{Value, json};

const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers

fn deploy_dir() -> PathBuf {
    workspace_dir().join("deploy")
}

fn read(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn json(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("deploy/{rel} is not JSON: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        text(out)
    );
}

/// A Python that can `import yaml`: the test venv's, the one on PATH, or Debian's. None (after
/// a loud skip, or a panic under CI) when there is none.
fn python_with_yaml() -> Option<PathBuf> {
    let venv = std::env::var_os("POOLGATE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join(".venv"))
        .join("bin/python3");
    let candidates = [
        venv,
        PathBuf::from("python3"),
        PathBuf::from("/usr/bin/python3"),
    ];
    for candidate in candidates {
        let Some(python) = find_tool(&candidate.to_string_lossy()) else {
            continue;
        };
        let ok = try_run_with_timeout(
            Command::new(&python).args(["-c", "import yaml"]),
            None,
            TOOL_TIMEOUT,
        )
        .is_ok_and(|out| out.status.success());
        if ok {
            return Some(python);
        }
    }
    let msg = "no python3 with PyYAML (apt-get install python3-yaml, or pip install pyyaml in \
               the test venv)";
    assert!(
        !in_ci(),
        "{msg}. CI=true, so this is a failure, not a skip."
    );
    eprintln!("\n******** SKIPPED: {msg}. (Under CI=true this fails the test.) ********\n");
    None
}

/// Parses a YAML file with PyYAML (safe_load) and returns it as JSON.
fn yaml(python: &Path, path: &Path) -> Value {
    let script = "import json, sys, yaml\n\
                  json.dump(yaml.safe_load(open(sys.argv[1], encoding='utf-8')), sys.stdout)";
    let out = run_with_timeout(
        Command::new(python).args(["-c", script]).arg(path),
        TOOL_TIMEOUT,
    );
    assert_success(&out, &format!("YAML parse of {}", path.display()));
    serde_json::from_slice(&out.stdout).expect("PyYAML output is JSON")
}

const CLOUD_INIT: [&str; 2] = ["cloud-init/pool-vm.yaml", "cloud-init/gateway.yaml"];

/// `write_files` of a cloud-init file: path → entry.
fn write_files(doc: &Value) -> BTreeMap<String, Value> {
    doc["write_files"]
        .as_array()
        .expect("write_files is a list")
        .iter()
        .map(|entry| {
            let path = entry["path"]
                .as_str()
                .expect("write_files entry has a path");
            (path.to_string(), entry.clone())
        })
        .collect()
}

fn content<'a>(files: &'a BTreeMap<String, Value>, path: &str) -> &'a str {
    files
        .get(path)
        .unwrap_or_else(|| panic!("cloud-init writes no {path}"))["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{path} has no text content"))
}

/// `__NAME__` placeholders in `text`.
fn placeholders(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("__") {
        let after = &rest[start + 2..];
        let len = after
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..len];
        if let Some(inner) = name.strip_suffix("__").filter(|n| !n.is_empty()) {
            if !inner.starts_with('_') && !inner.ends_with('_') {
                found.insert(format!("__{inner}__"));
            }
            rest = &after[len..];
        } else {
            rest = after;
        }
    }
    found
}

/// Every `poolgate_…` metric name in `text` (not a prefix of a longer word, not a recording
/// rule `poolgate:…`).
fn poolgate_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find("poolgate_") {
        let start = from + pos;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        };
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(text.len() - start);
        if boundary && end > start + "poolgate_".len() {
            names.insert(text[start..end].to_string());
        }
        from = end.max(start + 1);
    }
    names
}

/// Every string inside a JSON value.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// ARM template

fn resources_of<'a>(template: &'a Value, kind: &str) -> Vec<&'a Value> {
    template["resources"]
        .as_array()
        .expect("resources is a list")
        .iter()
        .filter(|r| r["type"].as_str() == Some(kind))
        .collect()
}

fn one<'a>(template: &'a Value, kind: &str) -> &'a Value {
    let found = resources_of(template, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

/// The one resource of `kind` whose name expression mentions `name_part`.
fn named<'a>(template: &'a Value, kind: &str, name_part: &str) -> &'a Value {
    let found: Vec<&Value> = resources_of(template, kind)
        .into_iter()
        .filter(|r| r["name"].as_str().unwrap_or_default().contains(name_part))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} named with {name_part}, found {}",
        found.len()
    );
    found[0]
}

/// The names `fun('name')` refers to in the template's expressions.
fn references(template: &Value, fun: &str) -> BTreeSet<String> {
    let mut all = Vec::new();
    strings(template, &mut all);
    let needle = format!("{fun}('");
    let mut names = BTreeSet::new();
    for s in all.iter().filter(|s| s.starts_with('[')) {
        let mut rest = s.as_str();
        while let Some(pos) = rest.find(&needle) {
            let after = &rest[pos + needle.len()..];
            let end = after.find('\'').expect("closing quote");
            names.insert(after[..end].to_string());
            rest = &after[end..];
        }
    }
    names
}

/// An ARM expression string: `[` … `]` with balanced parentheses and brackets outside
/// single-quoted literals (where `''` is an escaped quote).
fn check_expression(expr: &str) -> Result<(), String> {
    let inner = expr
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .ok_or("does not end with ]")?;
    let (mut depth, mut quoted) = (Vec::new(), false);
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                } else {
                    quoted = false;
                }
            }
            continue;
        }
        match c {
            '\'' => quoted = true,
            '(' | '[' => depth.push(c),
            ')' => (depth.pop() == Some('('))
                .then_some(())
                .ok_or("unbalanced )")?,
            ']' => (depth.pop() == Some('['))
                .then_some(())
                .ok_or("unbalanced ]")?,
            _ => {}
        }
    }
    if quoted {
        return Err("unterminated string literal".into());
    }
    if !depth.is_empty() {
        return Err(format!("unclosed {depth:?}"));
    }
    Ok(())
}

#[test]
fn arm_template_and_parameters_parse_and_have_the_required_resources() {
    let template = json("azure/azuredeploy.json");
    let example = json("azure/azuredeploy.parameters.example.json");
    assert!(
        template["$schema"]
            .as_str()
            .unwrap()
            .contains("deploymentTemplate.json"),
        "not an ARM deployment template"
    );

    // Expressions are well-formed and name only declared parameters and variables; every
    // parameter is used.
    let mut all = Vec::new();
    strings(&template, &mut all);
    for s in all
        .iter()
        .filter(|s| s.starts_with('[') && !s.starts_with("[["))
    {
        check_expression(s).unwrap_or_else(|e| panic!("bad ARM expression {s:?}: {e}"));
    }
    let params: BTreeSet<String> = template["parameters"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let vars: BTreeSet<String> = template["variables"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let used_params = references(&template, "parameters");
    let used_vars = references(&template, "variables");
    assert!(
        used_params.is_subset(&params),
        "undeclared parameters: {:?}",
        used_params.difference(&params).collect::<Vec<_>>()
    );
    assert!(
        used_vars.is_subset(&vars),
        "undeclared variables: {:?}",
        used_vars.difference(&vars).collect::<Vec<_>>()
    );
    assert_eq!(used_params, params, "every parameter is used");

    // The example gives only declared parameters and every one without a default.
    let given: BTreeSet<String> = example["parameters"]
        .as_object()
        .expect("parameters example has parameters")
        .keys()
        .cloned()
        .collect();
    assert!(
        given.is_subset(&params),
        "example sets unknown parameters: {:?}",
        given.difference(&params).collect::<Vec<_>>()
    );
    for (name, decl) in template["parameters"].as_object().unwrap() {
        if decl.get("defaultValue").is_none() {
            assert!(given.contains(name), "example lacks required {name}");
        }
        assert!(
            decl["metadata"]["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "parameter {name} has no description"
        );
    }

    // The scale set: Uniform, overprovision off, private NICs, cloud-init as customData.
    let vmss = one(&template, "Microsoft.Compute/virtualMachineScaleSets");
    assert_eq!(vmss["properties"]["orchestrationMode"], "Uniform");
    assert_eq!(vmss["properties"]["overprovision"], Value::Bool(false));
    let profile = &vmss["properties"]["virtualMachineProfile"];
    assert!(
        !profile.to_string().contains("publicIPAddressConfiguration"),
        "pool VMs must not get public addresses"
    );
    assert_eq!(
        profile["storageProfile"]["imageReference"],
        "[parameters('poolImage')]"
    );
    let default_image = &template["parameters"]["poolImage"]["defaultValue"];
    assert_eq!(
        default_image["publisher"], "microsoft-dsvm",
        "pool image: Data Science VM"
    );
    assert!(
        default_image["offer"]
            .as_str()
            .unwrap()
            .starts_with("ubuntu"),
        "Ubuntu DSVM"
    );

    // No Azure autoscale setting anywhere: poolgate owns the capacity.
    let mut kinds = Vec::new();
    strings(&template["resources"], &mut kinds);
    assert!(
        !kinds.iter().any(|s| s
            .to_ascii_lowercase()
            .contains("microsoft.insights/autoscalesettings")),
        "the template must not create an Azure autoscale setting"
    );

    // Every gateway VM has a managed identity; no role anywhere is Virtual Machine Contributor
    // (its run-command is root on every pool VM): the autoscaler gets the custom role checked
    // in custom_autoscaler_role_has_exactly_the_actions_of_the_provider.
    let gateway = one(&template, "Microsoft.Compute/virtualMachines");
    let identity = gateway["identity"]["type"].as_str().unwrap_or_default();
    assert!(
        identity.contains("SystemAssigned")
            || !resources_of(
                &template,
                "Microsoft.ManagedIdentity/userAssignedIdentities"
            )
            .is_empty(),
        "gateway VM has no managed identity: {identity:?}"
    );
    assert!(
        !template
            .to_string()
            .contains("9980e02c-c2be-4d73-94e8-173b1dc7cf3c"),
        "no Virtual Machine Contributor assignment"
    );
    for role in resources_of(&template, "Microsoft.Authorization/roleAssignments") {
        let props = &role["properties"];
        let principal = props["principalId"].as_str().unwrap();
        if principal.contains("Microsoft.Compute/virtualMachineScaleSets") {
            // The pool's identity: checked in pool_vms_read_only_the_jupyterhub_secret_and_the_munge_key_from_key_vault.
            continue;
        }
        assert!(
            principal.contains("gatewayNamePrefix") && principal.contains("identity.principalId"),
            "roles only for the gateway VMs' identities: {principal}"
        );
        assert_eq!(props["principalType"], "ServicePrincipal");
        assert_eq!(
            role["copy"]["count"], "[parameters('gatewayCount')]",
            "one assignment per gateway replica: {role}"
        );
    }

    // Azure Files: a storage account and the share that is /home (checked in
    // home_is_an_nfs_share_only_the_pool_subnet_reaches).
    one(&template, "Microsoft.Storage/storageAccounts");
    let share = one(
        &template,
        "Microsoft.Storage/storageAccounts/fileServices/shares",
    );
    assert!(
        share["name"]
            .as_str()
            .unwrap()
            .contains("variables('homeShareName')"),
        "the share of the users' homes"
    );

    // NSGs: public ports only on the gateway subnet; the pool subnet only from the gateway;
    // the private endpoints only from the subnet that uses each; everything else denied.
    let nsgs = resources_of(&template, "Microsoft.Network/networkSecurityGroups");
    assert_eq!(
        nsgs.len(),
        3,
        "one NSG for the gateway, one for the pool, one for the private endpoints"
    );
    let mut public_ports = BTreeSet::new();
    for nsg in &nsgs {
        let name = nsg["name"].as_str().unwrap();
        let rules = nsg["properties"]["securityRules"].as_array().unwrap();
        let is_gateway = name.contains("gatewayNsgName");
        let is_pool = name.contains("poolNsgName");
        let is_endpoints = name.contains("endpointsNsgName");
        assert!(
            is_gateway || is_pool || is_endpoints,
            "unexpected NSG {name}"
        );
        let last = rules
            .iter()
            .max_by_key(|r| r["properties"]["priority"].as_u64().unwrap())
            .unwrap();
        assert_eq!(
            last["properties"]["access"], "Deny",
            "{name} ends in deny-all"
        );
        assert_eq!(last["properties"]["sourceAddressPrefix"], "*");
        assert_eq!(last["properties"]["destinationPortRange"], "*");
        for rule in rules {
            let p = &rule["properties"];
            if p["access"] != "Allow" {
                continue;
            }
            assert_eq!(p["direction"], "Inbound", "{rule}");
            let source = p["sourceAddressPrefix"].as_str().unwrap();
            let dest = p["destinationAddressPrefix"].as_str().unwrap();
            let port = p["destinationPortRange"].as_str().unwrap();
            assert_ne!(port, "*", "an allow rule opens one port: {rule}");
            if is_gateway {
                assert_eq!(dest, "[parameters('gatewaySubnetPrefix')]", "{rule}");
                assert!(
                    source == "[parameters('userSourcePrefix')]"
                        || source == "[parameters('adminSourcePrefix')]"
                        || (source == "AzureLoadBalancer" && port == ADMIN_PORT)
                        // slurmctld on gateway 0, from the pool VMs and the other gateway.
                        || (port == SLURMCTLD_PORT
                            && [
                                "[parameters('poolSubnetPrefix')]",
                                "[parameters('gatewaySubnetPrefix')]"
                            ]
                            .contains(&source)),
                    "{rule}"
                );
                if source == "[parameters('userSourcePrefix')]" {
                    public_ports.insert(port.to_string());
                }
            } else if is_endpoints {
                assert_eq!(dest, "[parameters('endpointsSubnetPrefix')]", "{rule}");
                assert!(
                    (source == "[parameters('poolSubnetPrefix')]" && port == "2049")
                        || (source == "[parameters('gatewaySubnetPrefix')]" && port == "6380"),
                    "NFS only from the pool, Redis only from the gateways: {rule}"
                );
            } else {
                assert_eq!(dest, "[parameters('poolSubnetPrefix')]", "{rule}");
                if [SLURMD_PORT, SRUN_PORTS].contains(&port) {
                    // Slurm: from slurmctld on the gateway, and between the nodes of a job.
                    assert!(
                        source == "[parameters('gatewaySubnetPrefix')]"
                            || source == "[parameters('poolSubnetPrefix')]",
                        "{rule}"
                    );
                } else {
                    assert_eq!(
                        source, "[parameters('gatewaySubnetPrefix')]",
                        "pool VMs are reached only from the gateway, but for Slurm: {rule}"
                    );
                    assert!(["22", "8000"].contains(&port), "{rule}");
                }
            }
        }
    }
    assert!(
        public_ports.contains("22") && public_ports.contains("443"),
        "users reach the gateway's SSH and HTTPS: {public_ports:?}"
    );
    // The NSGs are attached to the subnets; no NIC has a public address (users reach the
    // gateways through the load balancer's).
    let vnet = one(&template, "Microsoft.Network/virtualNetworks").to_string();
    assert!(
        vnet.contains("gatewayNsgName")
            && vnet.contains("poolNsgName")
            && vnet.contains("endpointsNsgName")
    );
    assert!(
        vnet.contains("\"privateEndpointNetworkPolicies\":\"Enabled\""),
        "the endpoints subnet's NSG applies to its private endpoints"
    );
    for nic in resources_of(&template, "Microsoft.Network/networkInterfaces") {
        assert!(nic["name"].as_str().unwrap().contains("gatewayNamePrefix"));
        assert!(
            !nic.to_string().contains("publicIPAddress"),
            "gateway NICs have no public address: {nic}"
        );
    }

    // The cloud-init files are embedded verbatim (deploy/azure/embed-cloud-init.sh), and every
    // placeholder in them is replaced in the customData expression — and nothing else.
    for (var, file, custom) in [
        (
            "poolCloudInit",
            "cloud-init/pool-vm.yaml",
            &profile["osProfile"]["customData"],
        ),
        (
            "gatewayCloudInit",
            "cloud-init/gateway.yaml",
            &gateway["properties"]["osProfile"]["customData"],
        ),
    ] {
        let embedded = template["variables"][var].as_str().unwrap();
        assert!(
            embedded == read(file),
            "azuredeploy.json holds an old copy of deploy/{file}: run deploy/azure/embed-cloud-init.sh"
        );
        let custom = custom.as_str().unwrap();
        assert!(
            custom.starts_with("[base64(") && custom.contains(&format!("variables('{var}')")),
            "{custom}"
        );
        let in_file = placeholders(embedded);
        let replaced = placeholders(custom);
        assert_eq!(
            in_file, replaced,
            "placeholders of deploy/{file} vs those replaced in its customData"
        );
    }
}

/// Port of poolgate's admin listener on the gateway VMs (`/healthz` for the load balancer's
/// probe, `/metrics` for Prometheus, `/api/v1` with the admin token).
const ADMIN_PORT: &str = "9190";
/// slurmctld's port (SlurmctldPort in /etc/slurm/slurm.conf), slurmd's, and srun's range.
const SLURMCTLD_PORT: &str = "6817";
const SLURMD_PORT: &str = "6818";
const SRUN_PORTS: &str = "60001-63000";

/// The string value of `"[variables('name')]"` in the template.
fn variable<'a>(template: &'a Value, expr: &str) -> &'a Value {
    let name = expr
        .strip_prefix("[variables('")
        .and_then(|e| e.strip_suffix("')]"))
        .unwrap_or_else(|| panic!("{expr} is not [variables('…')]"));
    &template["variables"][name]
}

/// The gateway config cloud-init writes (`/etc/poolgate/poolgate.toml`), read without YAML: the
/// block under that write_files entry's `content: |`, de-indented, with the two bare-number
/// placeholders filled in so it parses as TOML (the string ones stay).
fn gateway_config_text() -> String {
    written_content(
        &read("cloud-init/gateway.yaml"),
        "/etc/poolgate/poolgate.toml",
    )
    .replace("__MIN_VMS__", "0")
    .replace("__MAX_VMS__", "10")
}

#[test]
fn two_gateways_in_distinct_zones_behind_a_standard_load_balancer() {
    let template = json("azure/azuredeploy.json");
    let params = &template["parameters"];
    assert_eq!(params["gatewayCount"]["defaultValue"], 2);
    assert_eq!(params["gatewayCount"]["allowedValues"], json!([1, 2]));
    let zones: Vec<&str> = params["gatewayZones"]["defaultValue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| z.as_str().unwrap())
        .collect();
    let distinct: BTreeSet<&str> = zones.iter().copied().collect();
    assert!(
        zones.len() >= 2 && distinct.len() == zones.len(),
        "two distinct default zones for two gateways: {zones:?}"
    );

    // The gateway VMs and their NICs: one per replica, replica i in gatewayZones[i].
    let gateway = one(&template, "Microsoft.Compute/virtualMachines");
    assert_eq!(gateway["copy"]["count"], "[parameters('gatewayCount')]");
    assert_eq!(
        gateway["zones"],
        json!(["[parameters('gatewayZones')[copyIndex()]]"]),
        "each replica in its own zone"
    );
    assert!(
        gateway["name"].as_str().unwrap().contains("copyIndex()")
            && gateway["properties"]["osProfile"]["computerName"] == gateway["name"],
        "replicas have distinct names, and so distinct replica_id (the host name)"
    );
    let nic = one(&template, "Microsoft.Network/networkInterfaces");
    assert_eq!(nic["copy"]["count"], "[parameters('gatewayCount')]");
    let ipconfig = &nic["properties"]["ipConfigurations"][0]["properties"];
    assert!(
        ipconfig["loadBalancerBackendAddressPools"][0]["id"]
            .as_str()
            .unwrap()
            .contains("backendAddressPools', variables('lbName'), 'gateways'"),
        "every gateway NIC is in the load balancer's backend pool: {ipconfig}"
    );

    // The public IP: Standard, static, zone-redundant.
    let lb = one(&template, "Microsoft.Network/loadBalancers");
    assert_eq!(lb["sku"]["name"], "Standard");
    let frontend = &lb["properties"]["frontendIPConfigurations"][0];
    let pip_ref = frontend["properties"]["publicIPAddress"]["id"]
        .as_str()
        .unwrap();
    let pips = resources_of(&template, "Microsoft.Network/publicIPAddresses");
    let pip = pips
        .iter()
        .find(|p| {
            let name = p["name"].as_str().unwrap();
            pip_ref.contains(name.trim_start_matches('[').trim_end_matches(']'))
        })
        .expect("the frontend's public IP is in the template");
    assert_eq!(pip["sku"]["name"], "Standard");
    assert_eq!(pip["properties"]["publicIPAllocationMethod"], "Static");
    assert_eq!(pip["zones"], json!(["1", "2", "3"]), "zone-redundant");

    // The probe: HTTP GET /healthz on the admin listener's port.
    let probes = lb["properties"]["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 1);
    let probe = &probes[0];
    let probe_port = match &probe["properties"]["port"] {
        Value::String(expr) => variable(&template, expr).to_string(),
        other => other.to_string(),
    };
    assert_eq!(probe_port, ADMIN_PORT);
    assert_eq!(probe["properties"]["protocol"], "Http");
    assert_eq!(probe["properties"]["requestPath"], "/healthz");
    let config: toml::Value = toml::from_str(&gateway_config_text()).unwrap();
    let admin = config["listen"]["admin"].as_str().unwrap();
    assert_eq!(
        admin,
        format!("0.0.0.0:{ADMIN_PORT}"),
        "the probe reaches the admin listener, which serves /healthz"
    );
    assert!(
        config["admin"]["token_file"].as_str().is_some(),
        "a non-loopback admin listener needs admin.token_file"
    );

    // Rules 22, 80, 443: TCP, same port behind, the probe, ≥ 30 min idle and TCP reset.
    let mut ports = BTreeSet::new();
    for rule in lb["properties"]["loadBalancingRules"].as_array().unwrap() {
        let p = &rule["properties"];
        assert_eq!(p["protocol"], "Tcp", "{rule}");
        assert_eq!(p["frontendPort"], p["backendPort"], "{rule}");
        assert!(
            p["probe"]["id"]
                .as_str()
                .unwrap()
                .contains(&format!("'{}'", probe["name"].as_str().unwrap())),
            "{rule}"
        );
        assert!(
            p["idleTimeoutInMinutes"].as_u64().unwrap() >= 30,
            "long SSH sessions need an idle timeout of 30 min or more: {rule}"
        );
        assert_eq!(p["enableTcpReset"], true, "{rule}");
        ports.insert(p["frontendPort"].as_u64().unwrap());
    }
    assert_eq!(ports, BTreeSet::from([22, 80, 443]));
    // The administrators' own sshd: one NAT port per replica, also with TCP reset.
    let nat = &lb["properties"]["copy"][0];
    assert_eq!(nat["name"], "inboundNatRules");
    assert_eq!(nat["count"], "[parameters('gatewayCount')]");
    assert_eq!(nat["input"]["properties"]["backendPort"], 2200);
    assert_eq!(nat["input"]["properties"]["enableTcpReset"], true);
    assert!(
        nat["input"]["properties"]["idleTimeoutInMinutes"]
            .as_u64()
            .unwrap()
            >= 30
    );
}

#[test]
fn redis_is_private_tls_only_and_the_gateways_cluster_uses_it() {
    let template = json("azure/azuredeploy.json");
    let redis = one(&template, "Microsoft.Cache/redis");
    let p = &redis["properties"];
    assert_eq!(p["publicNetworkAccess"], "Disabled");
    assert_eq!(p["enableNonSslPort"], false, "TLS port only");
    assert_eq!(p["minimumTlsVersion"], "1.2");

    // A private endpoint to it, in the vnet, and its DNS zone linked to the vnet.
    let endpoint = named(
        &template,
        "Microsoft.Network/privateEndpoints",
        "redisEndpointName",
    );
    let conn = &endpoint["properties"]["privateLinkServiceConnections"][0]["properties"];
    assert_eq!(
        conn["privateLinkServiceId"],
        "[resourceId('Microsoft.Cache/redis', variables('redisName'))]"
    );
    assert_eq!(conn["groupIds"], json!(["redisCache"]));
    assert!(
        endpoint["properties"]["subnet"]["id"]
            .as_str()
            .unwrap()
            .contains("endpointsSubnetId")
    );
    let zone = named(
        &template,
        "Microsoft.Network/privateDnsZones",
        "redisDnsZone",
    );
    assert_eq!(
        variable(&template, zone["name"].as_str().unwrap()),
        "privatelink.redis.cache.windows.net"
    );
    let link = named(
        &template,
        "Microsoft.Network/privateDnsZones/virtualNetworkLinks",
        "redisDnsZone",
    );
    assert!(
        link["properties"]["virtualNetwork"]["id"]
            .as_str()
            .unwrap()
            .contains("variables('vnetName')"),
        "the zone is linked to the vnet"
    );
    let group = named(
        &template,
        "Microsoft.Network/privateEndpoints/privateDnsZoneGroups",
        "redisEndpointName",
    );
    assert!(
        group["properties"]["privateDnsZoneConfigs"][0]["properties"]["privateDnsZoneId"]
            .as_str()
            .unwrap()
            .contains("redisDnsZone")
    );

    // The gateways' [cluster]: Redis over TLS at the cache's host name, password from a file.
    let config: toml::Value = toml::from_str(&gateway_config_text()).unwrap();
    let cluster = &config["cluster"];
    assert_eq!(cluster["store"].as_str(), Some("redis"));
    assert_eq!(
        cluster["redis_url"].as_str(),
        Some("rediss://__REDIS_HOST__:6380/0")
    );
    assert!(
        cluster["redis_password_file"]
            .as_str()
            .unwrap()
            .starts_with("/var/lib/poolgate/keys/")
    );
    let gateway = one(&template, "Microsoft.Compute/virtualMachines");
    let custom = gateway["properties"]["osProfile"]["customData"]
        .as_str()
        .unwrap();
    assert!(
        custom.contains(
            "'__REDIS_HOST__', reference(resourceId('Microsoft.Cache/redis', variables('redisName')), '2024-11-01').hostName)"
        ),
        "__REDIS_HOST__ is the cache's host name (resolved to the private endpoint by the zone)"
    );
}

#[test]
fn gateway_secrets_come_from_key_vault_not_custom_data() {
    let template = json("azure/azuredeploy.json");
    let gateway = one(&template, "Microsoft.Compute/virtualMachines");
    let custom = gateway["properties"]["osProfile"]["customData"]
        .as_str()
        .unwrap();
    assert!(
        !custom.contains("listKeys(") && !custom.contains("listSecrets("),
        "no access key in the gateways' customData: {custom}"
    );
    for (name, decl) in template["parameters"].as_object().unwrap() {
        if decl["type"] == "securestring" || decl["type"] == "secureObject" {
            assert!(
                !custom.contains(&format!("parameters('{name}')")),
                "secure parameter {name} in customData"
            );
        }
    }
    let cloud_init = read("cloud-init/gateway.yaml");
    for needle in [
        "PRIVATE KEY",
        "__STORAGE_KEY__",
        "password=__",
        "encoding: b64",
    ] {
        assert!(
            !cloud_init.contains(needle),
            "gateway.yaml carries a secret ({needle:?})"
        );
    }

    // The fetch script reads each secret with the managed identity's token and writes it 0600
    // where the config expects it.
    let fetch = written_file(&cloud_init, "/usr/local/sbin/poolgate-fetch-secrets");
    for needle in [
        "http://169.254.169.254/metadata/identity/oauth2/token",
        "Metadata:true",
        "/secrets/$1?api-version=7.4",
        "chmod 0600",
    ] {
        assert!(fetch.contains(needle), "fetch script lacks {needle:?}");
    }
    let config: toml::Value = toml::from_str(&gateway_config_text()).unwrap();
    let host_key = config["ssh"]["host_keys"][0].as_str().unwrap();
    let expected = [
        ("poolgate-ssh-host-key", host_key),
        (
            "poolgate-user-ca",
            config["ssh"]["user_ca_key"].as_str().unwrap(),
        ),
        (
            "poolgate-cookie-secret",
            config["http"]["cookie_secret_file"].as_str().unwrap(),
        ),
        (
            "poolgate-redis-password",
            config["cluster"]["redis_password_file"].as_str().unwrap(),
        ),
    ];
    for (secret, path) in expected {
        let file = path.rsplit('/').next().unwrap();
        assert!(
            fetch.contains(&format!("put {secret} \"$keys/{file}\" poolgate:poolgate")),
            "{secret} is written to {path} for poolgate"
        );
        assert!(path.starts_with("/var/lib/poolgate/keys/"), "{path}");
    }
    assert!(
        !fetch.contains("storage-key") && !cloud_init.contains("smbcredentials"),
        "the gateways hold no storage key: nothing they mount needs one"
    );
    // Users' keys survive a re-created replica when they are kept in the vault too.
    assert_eq!(
        config["ssh"]["authorized_keys"].as_str(),
        Some("/etc/poolgate/authorized_keys/{user}")
    );
    assert!(
        fetch.contains("/secrets/poolgate-authorized-keys?")
            && fetch.contains("dir=/etc/poolgate/authorized_keys"),
        "fetch script restores /etc/poolgate/authorized_keys from Key Vault"
    );
    let setup = written_file(&cloud_init, "/usr/local/sbin/poolgate-gateway-setup");
    let fetched = setup.find("/usr/local/sbin/poolgate-fetch-secrets");
    let started = setup.find("systemctl enable --now poolgate.service");
    assert!(
        fetched.is_some() && started.is_some() && fetched < started,
        "secrets are fetched before poolgate starts"
    );

    // The identities may read the vault's secrets; the template writes the two keys it knows.
    let kv_role = resources_of(&template, "Microsoft.Authorization/roleAssignments")
        .into_iter()
        .find(|r| {
            r["properties"]["roleDefinitionId"]
                .as_str()
                .unwrap()
                .contains("keyVaultSecretsUserRoleId")
        })
        .expect("a Key Vault Secrets User assignment");
    assert_eq!(
        template["variables"]["keyVaultSecretsUserRoleId"],
        "4633458b-17de-408a-b874-0445c86b69e6"
    );
    assert!(
        kv_role["scope"]
            .as_str()
            .unwrap()
            .contains("Microsoft.KeyVault/vaults/")
    );
    let secrets: BTreeSet<String> = resources_of(&template, "Microsoft.KeyVault/vaults/secrets")
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        secrets,
        BTreeSet::from([
            "[format('{0}/poolgate-redis-password', parameters('keyVaultName'))]".to_string(),
        ])
    );
}

#[test]
fn pool_vms_read_only_the_jupyterhub_secret_and_the_munge_key_from_key_vault() {
    let template = json("azure/azuredeploy.json");
    let vmss = one(&template, "Microsoft.Compute/virtualMachineScaleSets");
    let custom = vmss["properties"]["virtualMachineProfile"]["osProfile"]["customData"]
        .as_str()
        .unwrap();
    assert!(
        !custom.contains("listKeys(") && !custom.contains("listSecrets("),
        "no access key in the pool VMs' customData: {custom}"
    );
    let cloud_init = read("cloud-init/pool-vm.yaml");
    for needle in [
        "PRIVATE KEY",
        "__STORAGE_KEY__",
        "password=__",
        "smbcredentials",
        "storage-key",
    ] {
        assert!(
            !cloud_init.contains(needle),
            "pool-vm.yaml carries or fetches a secret it does not need ({needle:?})"
        );
    }
    assert_eq!(vmss["identity"]["type"], "SystemAssigned");

    // The scale set's identity may read exactly two secrets: JupyterHub's, by mode, and the
    // munge key of the pool's Slurm cluster.
    let pool_roles: Vec<&Value> =
        resources_of(&template, "Microsoft.Authorization/roleAssignments")
            .into_iter()
            .filter(|r| {
                r["properties"]["principalId"]
                    .as_str()
                    .unwrap()
                    .contains("Microsoft.Compute/virtualMachineScaleSets")
            })
            .collect();
    assert_eq!(pool_roles.len(), 2, "two roles for the pool's identity");
    let munge = pool_roles[1];
    assert_eq!(
        munge["scope"],
        "[format('Microsoft.KeyVault/vaults/{0}/secrets/{1}', parameters('keyVaultName'), 'poolgate-munge-key')]"
    );
    assert_eq!(
        munge["properties"]["roleDefinitionId"],
        pool_roles[0]["properties"]["roleDefinitionId"]
    );
    assert_eq!(munge["condition"], vmss["condition"]);
    let role = pool_roles[0];
    assert_eq!(
        role["scope"],
        "[format('Microsoft.KeyVault/vaults/{0}/secrets/{1}', parameters('keyVaultName'), variables('poolSecretName'))]"
    );
    assert_eq!(
        template["variables"]["poolSecretName"],
        "[if(equals(parameters('jupyterhubAuth'), 'azuread'), 'poolgate-jupyterhub-client-secret', 'poolgate-user-password-hashes')]"
    );
    assert!(
        role["properties"]["roleDefinitionId"]
            .as_str()
            .unwrap()
            .contains("keyVaultSecretsUserRoleId")
    );
    assert_eq!(
        role["condition"], vmss["condition"],
        "deployed with the scale set"
    );
    // The pool reads those three secrets (JupyterHub's two modes, the munge key) and no other.
    let mut read_secrets = BTreeSet::new();
    for (i, _) in cloud_init.match_indices("poolgate-vault-secret poolgate-") {
        let name: String = cloud_init[i + "poolgate-vault-secret ".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        read_secrets.insert(name);
    }
    assert_eq!(
        read_secrets,
        BTreeSet::from([
            "poolgate-jupyterhub-client-secret".to_string(),
            "poolgate-munge-key".to_string(),
            "poolgate-user-password-hashes".to_string(),
        ])
    );
    // The munge key is written 0400 for munge, never echoed.
    let slurm = written_file(&cloud_init, "/usr/local/sbin/poolgate-slurm-setup");
    assert!(
        slurm.contains("chmod 0400") && slurm.contains("chown munge:munge"),
        "{slurm}"
    );

    // Only root reaches the metadata service (where the identity's tokens come from), set up
    // before any user account exists and at every boot.
    let imds = written_file(&cloud_init, "/usr/local/sbin/poolgate-imds-root-only");
    assert!(
        imds.contains("OUTPUT -d 169.254.169.254/32 -p tcp -m owner ! --uid-owner 0 -j REJECT"),
        "{imds}"
    );
    let runcmd = &cloud_init[cloud_init.find("\nruncmd:").unwrap()..];
    let enable = runcmd
        .find("enable, --now, poolgate-imds-root-only.service")
        .expect("runcmd enables poolgate-imds-root-only.service");
    assert!(enable < runcmd.find("poolgate-pool-users").unwrap());
    let vault = written_file(&cloud_init, "/usr/local/sbin/poolgate-vault-secret");
    for needle in [
        "http://169.254.169.254/metadata/identity/oauth2/token",
        "/secrets/${name}?api-version=7.4",
    ] {
        assert!(vault.contains(needle), "vault script lacks {needle:?}");
    }
    let secret = written_file(&cloud_init, "/usr/local/sbin/poolgate-jupyterhub-secret");
    assert!(secret.contains("umask 077") && secret.contains("chmod 0600"));
}

/// The ARM actions behind each call of the azure-vmss provider on a Uniform scale set, with the
/// call it comes from (in gateway/src/autoscale/providers/azure/, tests and fake aside).
const PROVIDER_ACTIONS: [(&str, &str); 8] = [
    (
        "Microsoft.Compute/virtualMachineScaleSets/read",
        "let scale_set: ScaleSet = self.arm.get_json(\"create\", &path)",
    ),
    (
        "Microsoft.Compute/virtualMachineScaleSets/write",
        ".call(\"create\", Method::PATCH, &path, Some(&body))",
    ),
    (
        "Microsoft.Compute/virtualMachineScaleSets/start/action",
        "\"{}/{operation}?api-version={}\"",
    ),
    (
        "Microsoft.Compute/virtualMachineScaleSets/deallocate/action",
        "\"{}/{operation}?api-version={}\"",
    ),
    (
        "Microsoft.Compute/virtualMachineScaleSets/delete/action",
        "\"{}/{operation}?api-version={}\"",
    ),
    (
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
        "\"{base}/virtualMachines?$expand=instanceView&api-version={}\"",
    ),
    (
        "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write",
        "long_running(\"protect\", Method::PUT, &path, Some(&body))",
    ),
    (
        "Microsoft.Compute/virtualMachineScaleSets/networkInterfaces/read",
        "\"{base}/networkInterfaces?api-version={VMSS_NIC_API_VERSION}\"",
    ),
];

#[test]
fn custom_autoscaler_role_has_exactly_the_actions_of_the_provider() {
    // The provider's own sources (mod.rs and the files beside it), not its tests or fake.
    let dir = workspace_dir().join("gateway/src/autoscale/providers/azure");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.ends_with(".rs") && !name.starts_with("tests")
        })
        .collect();
    files.sort();
    let provider: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for (action, call) in PROVIDER_ACTIONS {
        assert!(
            provider.contains(call),
            "{action} is listed for a call the provider no longer makes ({call}); update the role"
        );
    }
    for operation in ["\"start\"", "\"deallocate\"", "\"delete\""] {
        assert!(
            provider.contains(&format!("instance_action({operation}")),
            "provider no longer calls instance_action({operation})"
        );
    }

    let template = json("azure/azuredeploy.json");
    let role = named(
        &template,
        "Microsoft.Authorization/roleDefinitions",
        "autoscalerRoleName",
    );
    let p = &role["properties"];
    assert_eq!(p["type"], "customRole");
    assert_eq!(p["assignableScopes"], json!(["[resourceGroup().id]"]));
    let permissions = p["permissions"].as_array().unwrap();
    assert_eq!(permissions.len(), 1);
    let actions = match &permissions[0]["actions"] {
        Value::String(expr) => variable(&template, expr).clone(),
        other => other.clone(),
    };
    let actions: BTreeSet<&str> = actions
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = PROVIDER_ACTIONS.iter().map(|(a, _)| *a).collect();
    assert_eq!(actions, expected, "the role's actions are the provider's");
    assert!(permissions[0]["dataActions"].is_null(), "no data actions");

    // Assigned to each gateway on the scale set, nowhere wider (instance protection sends only
    // the protectionPolicy, which names no subnet: no subnets/join on the pool subnet).
    let mut scopes = BTreeSet::new();
    for a in resources_of(&template, "Microsoft.Authorization/roleAssignments") {
        let id = a["properties"]["roleDefinitionId"].as_str().unwrap();
        if id.contains("autoscalerRoleName") {
            assert!(id.starts_with("[subscriptionResourceId("), "{id}");
            scopes.insert(a["scope"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        scopes,
        BTreeSet::from([
            "[format('Microsoft.Compute/virtualMachineScaleSets/{0}', variables('vmssName'))]"
                .to_string(),
        ])
    );
}

#[test]
fn redeploying_does_not_reset_the_scale_set_capacity() {
    let template = json("azure/azuredeploy.json");
    let flag = &template["parameters"]["poolScaleSetExists"];
    assert_eq!(flag["type"], "bool");
    assert_eq!(
        flag["defaultValue"], false,
        "the first deployment creates it"
    );
    let vmss = one(&template, "Microsoft.Compute/virtualMachineScaleSets");
    assert_eq!(
        vmss["condition"], "[not(parameters('poolScaleSetExists'))]",
        "with poolScaleSetExists = true the template does not touch the scale set"
    );
    assert_eq!(vmss["sku"]["capacity"], "[parameters('poolInitialCount')]");
    // Nothing else writes the scale set or its capacity: no nested deployment, no second
    // scale-set resource (one() above), no other resource naming sku.capacity.
    assert!(resources_of(&template, "Microsoft.Resources/deployments").is_empty());
    let others: Vec<&Value> = template["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] != "Microsoft.Compute/virtualMachineScaleSets")
        .collect();
    for r in others {
        assert!(
            r["sku"]["capacity"].is_null(),
            "{} sets a capacity",
            r["type"]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// cloud-init

#[test]
fn cloud_init_files_parse_and_do_what_the_pool_needs() {
    let Some(python) = python_with_yaml() else {
        return;
    };
    for rel in CLOUD_INIT {
        let raw = read(rel);
        assert!(
            raw.starts_with("#cloud-config\n"),
            "deploy/{rel} must start with #cloud-config"
        );
        let doc = yaml(&python, &deploy_dir().join(rel));
        assert!(doc.is_object(), "deploy/{rel} is a mapping");
        for (path, entry) in write_files(&doc) {
            assert!(path.starts_with('/'), "{rel}: {path}");
            let mode = entry["permissions"].as_str().unwrap_or_default();
            assert!(
                mode.len() == 4 && mode.starts_with('0'),
                "{rel}: {path}: permissions as a quoted octal string, got {mode:?}"
            );
            if path.starts_with("/etc/smbcredentials/") || path.contains("/keys/") {
                assert_eq!(mode, "0600", "{rel}: secret {path} must be 0600");
            }
        }
        if let Some(cloud_init) = find_tool("cloud-init") {
            let out = run_with_timeout(
                Command::new(cloud_init)
                    .args(["schema", "--config-file"])
                    .arg(deploy_dir().join(rel)),
                TOOL_TIMEOUT,
            );
            assert_success(&out, &format!("cloud-init schema {rel}"));
        }
    }

    // Pool VM: /home on the NFS share, the gateway CA, host keys on the console, JupyterHub.
    let pool = write_files(&yaml(&python, &deploy_dir().join(CLOUD_INIT[0])));
    assert!(
        !pool.keys().any(|p| p.starts_with("/etc/smbcredentials/")),
        "no SMB credentials: /home is NFS"
    );
    let mount = content(&pool, "/usr/local/sbin/poolgate-mount-home");
    for needle in [" /home nfs ", "/etc/fstab", "vers=4,minorversion=1,sec=sys"] {
        assert!(mount.contains(needle), "mount script lacks {needle:?}");
    }
    let sshd = content(&pool, "/etc/ssh/sshd_config.d/50-poolgate.conf");
    assert!(sshd.contains("TrustedUserCAKeys /etc/ssh/poolgate_user_ca.pub"));
    // The VM's name the gateway sends with each session (the tests' sshd VMs accept it the same
    // way, and show it only so).
    assert!(sshd.lines().any(|l| l == "AcceptEnv POOLGATE_VM"), "{sshd}");
    assert_eq!(
        content(&pool, "/etc/ssh/poolgate_user_ca.pub"),
        "__USER_CA_PUBLIC_KEY__\n"
    );
    assert!(content(&pool, "/usr/local/sbin/poolgate-hostkeys-console").contains("/dev/ttyS0"));
    assert!(content(&pool, "/etc/poolgate/jupyterhub_config.py").contains("\"http://:8000\""));
    let pool_runcmd =
        serde_json::to_string(&yaml(&python, &deploy_dir().join(CLOUD_INIT[0]))["runcmd"]).unwrap();
    for unit in [
        "poolgate-hostkeys-console.service",
        "poolgate-jupyterhub.service",
    ] {
        assert!(pool_runcmd.contains(unit), "runcmd enables {unit}");
    }
    for step in [
        "poolgate-mount-home",
        "poolgate-pool-users",
        "poolgate-jupyterhub-secret",
    ] {
        assert!(pool_runcmd.contains(step), "runcmd runs {step}");
    }
    assert!(
        pool_runcmd.find("poolgate-mount-home") < pool_runcmd.find("poolgate-pool-users"),
        "the share is /home before the users' homes are made"
    );

    // The busy check: the probe account, only its own principal, by certificate, no pty or
    // forwarding, and the default script installed verbatim.
    let probe = content(&pool, "/usr/local/sbin/poolgate-probe-account");
    for needle in [
        "useradd --system --shell /bin/sh",
        "--no-create-home poolgate-probe",
        "usermod -p '*' poolgate-probe",
    ] {
        assert!(
            probe.contains(needle),
            "probe account script lacks {needle:?}"
        );
    }
    assert!(
        pool_runcmd.contains("/usr/local/sbin/poolgate-probe-account"),
        "runcmd creates the probe account"
    );
    assert!(
        pool_runcmd.find("poolgate-probe-account") < pool_runcmd.find("poolgate-sshd-setup"),
        "the probe account exists before sshd is reloaded"
    );
    assert_eq!(
        content(&pool, "/etc/ssh/poolgate_probe_principals"),
        "restrict poolgate-probe\n"
    );
    let match_block = sshd
        .split_once("Match User poolgate-probe\n")
        .map(|(_, block)| block)
        .expect("50-poolgate.conf has a Match block for poolgate-probe");
    for needle in [
        "AuthorizedPrincipalsFile /etc/ssh/poolgate_probe_principals",
        "AuthorizedKeysFile none",
        "PasswordAuthentication no",
        "PermitTTY no",
        "AllowTcpForwarding no",
    ] {
        assert!(
            match_block.contains(needle),
            "probe Match block lacks {needle:?}"
        );
    }
    assert_eq!(
        content(&pool, "/usr/local/lib/poolgate/busy-check"),
        read("vm/poolgate-busy-check"),
        "pool-vm.yaml must install deploy/vm/poolgate-busy-check unchanged"
    );
    assert_eq!(
        pool["/usr/local/lib/poolgate/busy-check"]["permissions"].as_str(),
        Some("0755")
    );

    // Gateway VM: the unit is deploy/systemd/poolgate.service verbatim.
    let gateway = write_files(&yaml(&python, &deploy_dir().join(CLOUD_INIT[1])));
    assert_eq!(
        content(&gateway, "/etc/systemd/system/poolgate.service"),
        read("systemd/poolgate.service"),
        "gateway.yaml must embed deploy/systemd/poolgate.service unchanged (run deploy/azure/embed-cloud-init.sh)"
    );
    let config = content(&gateway, "/etc/poolgate/poolgate.toml");
    for needle in [
        "provider = \"azure-vmss\"",
        "credential = \"managed-identity\"",
        "subscription_id = \"__SUBSCRIPTION_ID__\"",
        "resource_group = \"__RESOURCE_GROUP__\"",
        "scale_set = \"__SCALE_SET__\"",
    ] {
        assert!(config.contains(needle), "gateway config lacks {needle}");
    }
}

/// The gateway config cloud-init writes, with placeholders filled in and its absolute paths
/// moved into `root`, passes `poolgate check-config`.
#[test]
fn gateway_config_written_by_cloud_init_passes_check_config() {
    require_tools!("ssh-keygen", "openssl");
    let Some(python) = python_with_yaml() else {
        return;
    };
    let files = write_files(&yaml(&python, &deploy_dir().join(CLOUD_INIT[1])));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let etc = root.join("etc/poolgate");
    let state = root.join("var/lib/poolgate/keys");
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let config = content(&files, "/etc/poolgate/poolgate.toml")
        .replace("/etc/poolgate/", &format!("{}/", etc.display()))
        .replace(
            "/var/lib/poolgate/",
            &format!("{}/", root.join("var/lib/poolgate").display()),
        )
        .replace(
            "__SUBSCRIPTION_ID__",
            "00000000-0000-0000-0000-000000000000",
        )
        .replace("__RESOURCE_GROUP__", "rg-poolgate")
        .replace("__SCALE_SET__", "poolgate-pool")
        .replace("__MIN_VMS__", "0")
        .replace("__MAX_VMS__", "10")
        // What the template's environment().resourceManager gives in Azure Government.
        .replace("__ARM_ENDPOINT__", "https://management.usgovcloudapi.net/")
        // A name that never resolves: check-config reports the store unreachable and passes,
        // as `run` would start and join when it answers.
        .replace("__REDIS_HOST__", "redis.invalid");
    assert!(placeholders(&config).is_empty(), "{config}");
    let config_path = etc.join("poolgate.toml");
    std::fs::write(&config_path, &config).unwrap();

    // What the gateway's first boot creates: the files poolgate-fetch-secrets takes from Key
    // Vault (the `poolgate keys init` bundle an operator stored there, the Redis password), the
    // admin token, a self-signed certificate (same openssl command as
    // poolgate-gateway-setup), and backend_known_hosts with the placeholder.
    let out = run_with_timeout(
        Command::new(poolgate_bin())
            .args(["keys", "init"])
            .arg(&state),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "poolgate keys init");
    for (file, body) in [
        (state.join("redis_password"), "access-key-from-key-vault"),
        (etc.join("admin_token"), "0123456789abcdef0123456789abcdef"),
    ] {
        std::fs::write(&file, body).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = run_with_timeout(
        Command::new(tool("openssl"))
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "30", "-subj", "/CN=pool.example.org"])
            .args(["-addext", "subjectAltName=DNS:pool.example.org", "-keyout"])
            .arg(etc.join("tls/key.pem"))
            .arg("-out")
            .arg(etc.join("tls/cert.pem")),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "openssl req");
    std::fs::set_permissions(
        etc.join("tls/key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let host = root.join("host_key");
    generate_ed25519(&host, "vm");
    let host_pub = std::fs::read_to_string(host.with_extension("pub")).unwrap();
    let mut fields = host_pub.split_whitespace();
    let (kind, blob) = (fields.next().unwrap(), fields.next().unwrap());
    std::fs::write(
        state.join("backend_known_hosts"),
        format!("poolgate-placeholder.invalid {kind} {blob}\n10.40.1.4 {kind} {blob}\n"),
    )
    .unwrap();

    let out = run_with_timeout(
        Command::new(poolgate_bin())
            .arg("check-config")
            .arg(&config_path),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "poolgate check-config on the gateway.yaml config");
}

#[test]
fn shellcheck_passes_on_every_shell_script_under_deploy() {
    require_tools!("shellcheck");
    let Some(python) = python_with_yaml() else {
        return;
    };
    let extracted = tempfile::tempdir().unwrap();
    let mut scripts: Vec<(String, PathBuf)> = Vec::new();

    // Files in deploy/ that are shell scripts (by extension or shebang).
    let mut stack = vec![deploy_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let head = std::fs::read(&path).unwrap_or_default();
            let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let shebang = first.starts_with(b"#!") && {
                let line = String::from_utf8_lossy(first);
                line.ends_with("sh") || line.contains("bash") || line.contains("/sh ")
            };
            if shebang || path.extension().is_some_and(|e| e == "sh") {
                let name = path
                    .strip_prefix(workspace_dir())
                    .unwrap()
                    .display()
                    .to_string();
                scripts.push((name, path));
            }
        }
    }
    // Scripts that cloud-init writes (write_files with a shell shebang).
    for rel in CLOUD_INIT {
        for (path, entry) in write_files(&yaml(&python, &deploy_dir().join(rel))) {
            let Some(body) = entry["content"].as_str() else {
                continue;
            };
            let first = body.lines().next().unwrap_or_default();
            if first.starts_with("#!") && (first.ends_with("sh") || first.contains("bash")) {
                let file = extracted.path().join(format!(
                    "{}{}",
                    rel.replace('/', "_"),
                    path.replace('/', "_")
                ));
                std::fs::write(&file, body).unwrap();
                scripts.push((format!("deploy/{rel}: {path}"), file));
            }
        }
    }
    assert!(
        scripts.len() >= 8,
        "expected the embed script and the cloud-init scripts, found {scripts:?}"
    );
    let mut failures = Vec::new();
    for (name, path) in &scripts {
        let out = run_with_timeout(
            Command::new(tool("shellcheck"))
                .args(["--severity=style", "--external-sources"])
                .arg(path),
            TOOL_TIMEOUT,
        );
        if !out.status.success() {
            failures.push(format!("--- {name}\n{}", text(&out)));
        }
    }
    assert!(
        failures.is_empty(),
        "shellcheck found problems:\n{}",
        failures.join("\n")
    );
    eprintln!("shellcheck: {} scripts clean", scripts.len());
}

#[test]
fn sshd_accepts_the_sshd_config_fragments_cloud_init_writes() {
    require_tools!("sshd", "ssh-keygen");
    let Some(python) = python_with_yaml() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let host_key = dir.path().join("host_ed25519");
    generate_ed25519(&host_key, "sshd-t");
    let ca = dir.path().join("user_ca");
    generate_ed25519(&ca, "ca");
    let minimal = format!("HostKey {}\nPidFile none\nUsePAM no\n", host_key.display());
    let sshd_t = |name: &str, body: &str| -> Output {
        let file = dir.path().join(name);
        std::fs::write(&file, format!("{minimal}{body}")).unwrap();
        run_with_timeout(
            Command::new(tool("sshd")).arg("-t").arg("-f").arg(&file),
            TOOL_TIMEOUT,
        )
    };
    // The check itself works: a bad option fails.
    let bad = sshd_t("bad_config", "NoSuchOption yes\n");
    assert!(!bad.status.success(), "sshd -t accepted garbage");

    let mut checked = 0;
    for rel in CLOUD_INIT {
        for (path, entry) in write_files(&yaml(&python, &deploy_dir().join(rel))) {
            if !path.starts_with("/etc/ssh/sshd_config.d/") {
                continue;
            }
            let fragment = entry["content"].as_str().unwrap();
            let out = sshd_t("sshd_config", fragment);
            assert_success(&out, &format!("sshd -t on {rel}: {path}"));
            // The CA line works with a real key in the place cloud-init puts it.
            let with_real_ca = fragment.replace(
                "/etc/ssh/poolgate_user_ca.pub",
                &ca.with_extension("pub").display().to_string(),
            );
            let out = sshd_t("sshd_config_ca", &with_real_ca);
            assert_success(
                &out,
                &format!("sshd -t on {rel}: {path} with a real CA key"),
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 2,
        "the pool VM's and the gateway VM's sshd fragments"
    );
}

// ---------------------------------------------------------------------------------------------
// systemd

/// `[Service]` settings of a unit file: key → values in order.
fn unit_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        settings
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    settings
}

/// `10m`, `11min`, `600s`, `1h` → seconds.
fn seconds(value: &str) -> u64 {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (n, unit) = value.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration {value:?}"));
    n * match unit {
        "" | "s" | "sec" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        _ => panic!("unit of {value:?}"),
    }
}

#[test]
fn systemd_unit_has_the_hardening_reload_and_drain_the_gateway_needs() {
    let unit = read("systemd/poolgate.service");
    let s = unit_settings(&unit);
    let get = |key: &str| -> String {
        s.get(key)
            .unwrap_or_else(|| panic!("poolgate.service has no {key}="))
            .join(" ")
    };
    assert_eq!(get("NoNewPrivileges"), "yes");
    assert_eq!(get("ProtectSystem"), "strict");
    assert_eq!(get("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(get("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(get("ExecReload"), "/bin/kill -HUP $MAINPID");
    let state = get("StateDirectory");
    assert!(
        state.split_whitespace().any(|d| d == "poolgate")
            && state.split_whitespace().any(|d| d == "poolgate/keys"),
        "StateDirectory={state}"
    );
    assert_eq!(get("ConfigurationDirectory"), "poolgate");
    assert!(get("ExecStart").contains("run --config /etc/poolgate/poolgate.toml"));
    assert_eq!(get("KillSignal"), "SIGTERM");
    assert!(s.contains_key("User"), "runs as its own user");
    // journald's default (10 000 lines per 30 s) would silence audit lines under HTTP load.
    assert_eq!(get("LogRateLimitIntervalSec"), "30s");
    assert!(
        get("LogRateLimitBurst").parse::<u64>().unwrap() >= 30 * 10_000,
        "LogRateLimitBurst={} holds fewer than 10 000 lines/s",
        get("LogRateLimitBurst")
    );

    // TimeoutStopSec covers the drain: the gateway config's shutdown_grace plus a margin.
    let Some(python) = python_with_yaml() else {
        return;
    };
    let files = write_files(&yaml(&python, &deploy_dir().join(CLOUD_INIT[1])));
    let config = content(&files, "/etc/poolgate/poolgate.toml");
    let grace = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("shutdown_grace = "))
        .expect("gateway config sets shutdown_grace")
        .trim_matches('"');
    let stop = seconds(&get("TimeoutStopSec"));
    assert!(
        stop > seconds(grace) && stop <= seconds(grace) + 300,
        "TimeoutStopSec={stop}s should be a little above shutdown_grace={grace}"
    );

    // systemd's own verdict, with the binary path pointed at the one under test.
    let Some(analyze) = find_tool("systemd-analyze") else {
        eprintln!("systemd-analyze not installed: structural checks only");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("poolgate.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/poolgate",
            &poolgate_bin().display().to_string(),
        ),
    )
    .unwrap();
    let out = run_with_timeout(Command::new(analyze).arg("verify").arg(&copy), TOOL_TIMEOUT);
    let said = text(&out);
    // It exits 0 even for settings it ignores, so any line about our file is a failure.
    assert!(
        out.status.success() && !said.contains("poolgate.service"),
        "systemd-analyze verify poolgate.service:\n{said}"
    );
}

// ---------------------------------------------------------------------------------------------
// Prometheus

#[test]
fn prometheus_rules_and_scrape_config_pass_promtool() {
    require_tools!("promtool");
    let prom = deploy_dir().join("prometheus");
    let out = run_with_timeout(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(prom.join("poolgate-rules.yml")),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "promtool check rules");
    let out = run_with_timeout(
        Command::new(tool("promtool"))
            .args(["test", "rules", "poolgate-rules.test.yml"])
            .current_dir(&prom),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "promtool test rules");

    // The scrape config names the rules at their installed path; check a copy pointing here.
    let config = read("prometheus/prometheus.yml");
    assert!(config.contains("/etc/prometheus/poolgate-rules.yml"));
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("prometheus.yml");
    std::fs::write(
        &copy,
        config.replace(
            "/etc/prometheus/poolgate-rules.yml",
            &prom.join("poolgate-rules.yml").display().to_string(),
        ),
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new(tool("promtool"))
            .args(["check", "config"])
            .arg(&copy),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "promtool check config");

    // The TLS-expiry alerts read the blackbox job the scrape config defines, with a module
    // blackbox.yml defines as a TLS probe.
    let rules = read("prometheus/poolgate-rules.yml");
    assert!(rules.contains("probe_ssl_earliest_cert_expiry{job=\"poolgate-tls\"}"));
    assert!(config.contains("job_name: poolgate-tls") && config.contains("module: [poolgate_tls]"));
    let Some(python) = python_with_yaml() else {
        return;
    };
    let blackbox = yaml(&python, &prom.join("blackbox.yml"));
    let module = &blackbox["modules"]["poolgate_tls"];
    assert_eq!(module["prober"], "tcp");
    assert_eq!(module["tcp"]["tls"], Value::Bool(true));
}

// ---------------------------------------------------------------------------------------------
// Grafana

/// PromQL expressions of the dashboard's panels (targets) and template variables.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let nested = panel["panels"].as_array().cloned().unwrap_or_default();
        for p in std::iter::once(panel).chain(nested.iter()) {
            for target in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    exprs.push(expr.to_string());
                }
            }
        }
    }
    exprs
}

#[test]
fn grafana_dashboard_parses_and_its_queries_are_valid_promql() {
    let dashboard = json("grafana/poolgate-dashboard.json");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()));
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 15, "{exprs:?}");
    let all = exprs.join("\n");
    // What the issue asks the dashboard to show.
    for metric in [
        "poolgate_sessions_active",
        "poolgate_vm_up",
        "poolgate_connect_seconds_bucket",
        "poolgate_autoscale_desired_vms",
        "poolgate_pool_vms",
        "poolgate_sessions_waiting",
    ] {
        assert!(all.contains(metric), "dashboard does not show {metric}");
    }
    assert!(
        all.contains("by (vm, protocol)"),
        "sessions per VM and protocol"
    );

    // promtool parses every expression (as recording rules) once Grafana's variables are filled.
    require_tools!("promtool");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$instance", ".*");
        assert!(!expr.contains('$'), "unhandled variable in {expr}");
        let quoted = serde_json::to_string(&expr).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = run_with_timeout(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(&file),
        TOOL_TIMEOUT,
    );
    assert_success(
        &out,
        &format!("promtool check rules on the dashboard's queries\n{rules}"),
    );
}

// ---------------------------------------------------------------------------------------------
// Metric names against a live gateway

/// A stand-in for a pool VM's web side on 127.0.0.1: node_exporter text on `/metrics`, a tiny
/// page everywhere else. Serves until the test process exits.
fn spawn_vm_web() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&head);
                let body = if request.starts_with("GET /metrics ") {
                    "node_load1 0.5\nnode_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} 1\n\
                     node_cpu_seconds_total{cpu=\"1\",mode=\"idle\"} 1\n"
                } else {
                    "hello from the VM\n"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    http_request(addr, "GET", path)
}

fn http_request(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: deploy-test\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// Metric names a `/metrics` scrape exposes; histogram families also under their base name.
fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.split_whitespace().next() {
                names.insert(name.to_string());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..end];
            names.insert(name.to_string());
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix)
                    && scrape.contains(&format!("# TYPE {base} histogram"))
                {
                    names.insert(base.to_string());
                }
            }
        }
    }
    names
}

#[test]
fn dashboard_and_alert_rules_use_only_metrics_a_live_gateway_exports() {
    require_tools!("ssh", "ssh-keygen");
    let dashboard = read("grafana/poolgate-dashboard.json");
    let rules = read("prometheus/poolgate-rules.yml");
    let wanted: BTreeMap<String, &str> = poolgate_names(&dashboard)
        .into_iter()
        .map(|n| (n, "dashboard"))
        .chain(
            poolgate_names(&rules)
                .into_iter()
                .map(|n| (n, "alert rules")),
        )
        .collect();
    assert!(wanted.len() >= 10, "{wanted:?}");

    // A gateway whose families all have samples: labelled metrics appear in /metrics only
    // after their first event. One VM (the web stand-in; no sshd needed with ssh probes off),
    // load read from its "node_exporter", an exec provider whose `create` fails so the
    // autoscaler records errors, then one proxied request and one failed SSH login.
    let web = spawn_vm_web();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("vm_host_key");
    generate_ed25519(&key, "vm");
    let host_pub = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    std::fs::write(
        dir.path().join("backend_known_hosts"),
        format!("[127.0.0.1]:{web} {host_pub}"),
    )
    .unwrap();
    let (ssh, http, admin) = (free_port(), free_port(), free_port());
    let list = format!(
        r#"{{"vms":[{{"name":"vm-1","host":"127.0.0.1","state":"running","ssh_port":{web},"http_port":{web}}}]}}"#
    );
    let config = format!(
        r#"[listen]
ssh = "127.0.0.1:{ssh}"
http = "127.0.0.1:{http}"
admin = "127.0.0.1:{admin}"

[ssh]
backend_known_hosts = "backend_known_hosts"
authorized_keys = "authorized_keys/{{user}}"
password_auth = "passthrough"

[health]
ssh = false
http = false
interval = "1s"
timeout = "1s"
load_metrics_port = {web}

[pool]
provider = "exec"

[pool.exec]
list = ["sh", "-c", {list_arg}]
create = ["false"]
delete = ["false"]
poll_interval = "1s"

[autoscale]
enabled = true
min_vms = 2
max_vms = 3
tick = "1s"
cooldown = "0s"
wake_on_connect = false
"#,
        list_arg = serde_json::to_string(&format!("echo '{list}'")).unwrap(),
    );
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let http_addr = SocketAddr::from(([127, 0, 0, 1], http));
    let gateway = GatewayProcess::builder(&config)
        .dir(dir.path())
        .wait_for(SocketAddr::from(([127, 0, 0, 1], ssh)))
        .wait_for(http_addr)
        .wait_for(admin_addr)
        .start();

    // One failed login. A rejected public-key offer is not counted by the gateway (only a
    // signed attempt is), so this is a password attempt — with a user name the gateway refuses
    // before trying any VM (`+` is not allowed), answered by an askpass program.
    let askpass = dir.path().join("askpass");
    std::fs::write(&askpass, "#!/bin/sh\necho not-the-password\n").unwrap();
    std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_with_timeout(
        Command::new(tool("ssh"))
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "PreferredAuthentications=password",
                "-o",
                "PubkeyAuthentication=no",
            ])
            .args(["-o", "NumberOfPasswordPrompts=1", "-o", "ConnectTimeout=10"])
            .args(["-p", &ssh.to_string(), "pg+nobody@127.0.0.1", "true"]),
        TOOL_TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "that login should fail:\n{}",
        text(&out)
    );

    // Proxied requests until the VM is picked up and answers, then one with the VM drained
    // (no VM for a new browser session).
    wait_until(
        Duration::from_secs(30),
        "a request proxied to the VM",
        || http_get(http_addr, "/hub/health").contains("hello from the VM"),
    );
    let drained = http_request(admin_addr, "POST", "/api/v1/vms/vm-1/drain");
    assert!(drained.starts_with("HTTP/1.1 200"), "{drained}");
    let refused = http_get(http_addr, "/hub/health");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let undrained = http_request(admin_addr, "POST", "/api/v1/vms/vm-1/undrain");
    assert!(undrained.starts_with("HTTP/1.1 200"), "{undrained}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing: Vec<String>;
    let mut scrape;
    loop {
        let _ = http_get(http_addr, "/hub/health");
        scrape = http_get(admin_addr, "/metrics");
        let exported = exported_names(&scrape);
        missing = wanted
            .keys()
            .filter(|n| !exported.contains(*n))
            .cloned()
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        missing.is_empty(),
        "names used in deploy/ that a live gateway does not export: {}\n--- /metrics ---\n{scrape}\n--- log ---\n{}",
        missing
            .iter()
            .map(|n| format!("{n} ({})", wanted[n]))
            .collect::<Vec<_>>()
            .join(", "),
        gateway.log_text()
    );
    eprintln!(
        "deploy/ uses {} poolgate metric names, all exported",
        wanted.len()
    );
}

#[test]
fn name_scanners_find_what_they_should() {
    let names = poolgate_names(
        "rate(poolgate_x_total[5m]) poolgate:recorded poolgate_* xpoolgate_no {poolgate_y}",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["poolgate_x_total", "poolgate_y"]
    );
    assert_eq!(
        placeholders("a __ONE__ b __TWO_2__ c ___ d __x__ __")
            .into_iter()
            .collect::<Vec<_>>(),
        ["__ONE__", "__TWO_2__"]
    );
    assert!(check_expression("[concat('a(', parameters('b'))]").is_ok());
    assert!(check_expression("[concat('it''s', parameters('b')]").is_err());
    assert_eq!(seconds("11min"), 660);
    assert_eq!(seconds("10m"), 600);
    let scrape = "# TYPE poolgate_c histogram\npoolgate_c_bucket{le=\"1\"} 0\npoolgate_g 1\n";
    let names = exported_names(scrape);
    assert!(names.contains("poolgate_c") && names.contains("poolgate_g"));
}

// ---------------------------------------------------------------------------------------------
// Pool VM host keys, homes, users, JupyterHub login, tags — and a re-created gateway

/// A shell script cloud-init installs, written to `dir` (0755) so a test can run it.
fn extracted_script(python: &Path, rel: &str, path: &str, dir: &Path) -> PathBuf {
    let files = write_files(&yaml(python, &deploy_dir().join(rel)));
    let file = dir.join(path.rsplit('/').next().unwrap());
    std::fs::write(&file, content(&files, path)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    file
}

#[test]
fn pool_vm_host_keys_reach_the_gateway_only_from_the_vms_own_console() {
    require_tools!("bash", "ssh-keygen");
    let Some(python) = python_with_yaml() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let console = extracted_script(
        &python,
        CLOUD_INIT[0],
        "/usr/local/sbin/poolgate-hostkeys-console",
        dir.path(),
    );
    let known_hosts = extracted_script(
        &python,
        CLOUD_INIT[1],
        "/usr/local/sbin/poolgate-known-hosts",
        dir.path(),
    );

    // The VM writes its real host keys as one block (to a file standing in for /dev/ttyS0).
    let ssh_dir = dir.path().join("etc-ssh");
    std::fs::create_dir(&ssh_dir).unwrap();
    generate_ed25519(&ssh_dir.join("ssh_host_ed25519_key"), "vm");
    let ed25519 = std::fs::read_to_string(ssh_dir.join("ssh_host_ed25519_key.pub")).unwrap();
    let ed25519: Vec<&str> = ed25519.split_whitespace().take(2).collect();
    let tty = dir.path().join("ttyS0");
    let out = run_with_timeout(
        Command::new(tool("bash"))
            .arg(&console)
            .arg(&tty)
            .arg(&ssh_dir),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "poolgate-hostkeys-console");
    let block = std::fs::read_to_string(&tty).unwrap();
    assert!(
        block.starts_with("poolgate-hostkeys-begin\r\n"),
        "{block:?}"
    );

    // A console log as Azure keeps it: boot noise, a block broken by a kernel line, the VM's
    // block, later a second block (the next boot, or root on that VM) — the first complete
    // block counts, CR LF or not.
    let log = format!(
        "[    0.000000] Linux version 6.8.0-azure\r\n\
         poolgate-hostkeys-begin\r\n\
         poolgate-hostkey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBROKENBROKENBROKENBROKENBROKENBROKENBROKENBR\r\n\
         [    3.141592] audit: type=1400\r\n\
         poolgate-hostkeys-end\r\n\
         {block}\
         Ubuntu 22.04 LTS poolgatevm000003 ttyS0\r\n\
         poolgate-hostkeys-begin\r\n\
         poolgate-hostkey ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILATERLATERLATERLATERLATERLATERLATERLATERLA\r\n\
         poolgate-hostkeys-end\r\n"
    );
    let parse = |input: &str| -> String {
        let out = run_with_input(
            Command::new(tool("bash")).arg(&known_hosts).arg("--parse"),
            input.as_bytes(),
            TOOL_TIMEOUT,
        );
        assert_success(&out, "poolgate-known-hosts --parse");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(parse(&log), format!("{} {}\n", ed25519[0], ed25519[1]));
    // Nothing that is not a complete block counts.
    assert_eq!(
        parse("poolgate-hostkeys-begin\npoolgate-hostkey ssh-ed25519 AAAA\n"),
        ""
    );
    assert_eq!(
        parse(
            "[ 1.0] poolgate-hostkeys-begin\npoolgate-hostkey ssh-dss AAAA\npoolgate-hostkeys-end\n"
        ),
        ""
    );

    // Pool side: written before any account exists, and at every boot before sshd and user
    // sessions; nothing is published on a share any more.
    let pool = read(CLOUD_INIT[0]);
    let runcmd = &pool[pool.find("\nruncmd:").unwrap()..];
    assert!(
        runcmd.find("poolgate-hostkeys-console.service").unwrap()
            < runcmd.find("poolgate-pool-users").unwrap()
    );
    let unit = written_file(
        &pool,
        "/etc/systemd/system/poolgate-hostkeys-console.service",
    );
    assert!(unit.contains("Before=ssh.service ssh.socket systemd-user-sessions.service"));
    for gone in ["hostkeys/", "ADMIN_SHARE", "cifs"] {
        assert!(
            !pool.contains(gone),
            "pool-vm.yaml still publishes on a share: {gone}"
        );
    }

    // Gateway side: only this one ARM action, on the scale set, for each gateway; the pool's
    // boot diagnostics are on (managed storage: no account key anywhere).
    let gateway = read(CLOUD_INIT[1]);
    let script = written_file(&gateway, "/usr/local/sbin/poolgate-known-hosts");
    assert!(script.contains("/retrieveBootDiagnosticsData?api-version="));
    assert!(script.contains("/api/v1/vms"));
    let config: toml::Value = toml::from_str(&gateway_config_text()).unwrap();
    assert!(
        script.contains(&format!(
            "admin=http://127.0.0.1:{}",
            config["listen"]["admin"]
                .as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
        )),
        "poolgate-known-hosts asks the admin listener the config opens"
    );
    let template = json("azure/azuredeploy.json");
    let role = named(
        &template,
        "Microsoft.Authorization/roleDefinitions",
        "hostKeysRoleName",
    );
    assert_eq!(
        variable(
            &template,
            role["properties"]["permissions"][0]["actions"]
                .as_str()
                .unwrap()
        ),
        &json!([
            "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/retrieveBootDiagnosticsData/action"
        ])
    );
    let assignments: Vec<&Value> =
        resources_of(&template, "Microsoft.Authorization/roleAssignments")
            .into_iter()
            .filter(|a| {
                a["properties"]["roleDefinitionId"]
                    .as_str()
                    .unwrap()
                    .contains("hostKeysRoleName")
            })
            .collect();
    assert_eq!(assignments.len(), 1);
    assert_eq!(
        assignments[0]["scope"],
        "[format('Microsoft.Compute/virtualMachineScaleSets/{0}', variables('vmssName'))]"
    );
    assert_eq!(
        assignments[0]["copy"]["count"],
        "[parameters('gatewayCount')]"
    );
    let vmss = one(&template, "Microsoft.Compute/virtualMachineScaleSets");
    let diagnostics =
        &vmss["properties"]["virtualMachineProfile"]["diagnosticsProfile"]["bootDiagnostics"];
    assert_eq!(diagnostics["enabled"], true);
    assert!(
        diagnostics["storageUri"].is_null(),
        "managed boot diagnostics storage"
    );
}

#[test]
fn home_is_an_nfs_share_only_the_pool_subnet_reaches() {
    let template = json("azure/azuredeploy.json");
    let account = one(&template, "Microsoft.Storage/storageAccounts");
    assert_eq!(
        account["kind"], "FileStorage",
        "NFS needs premium FileStorage"
    );
    assert_eq!(account["sku"]["name"], "[parameters('homeStorageSku')]");
    let allowed = &template["parameters"]["homeStorageSku"]["allowedValues"];
    assert!(
        allowed
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s.as_str().unwrap().starts_with("Premium_"))
    );
    let p = &account["properties"];
    assert_eq!(
        p["supportsHttpsTrafficOnly"], false,
        "NFS without encryption in transit needs secure transfer off"
    );
    assert_eq!(p["publicNetworkAccess"], "Disabled");
    assert_eq!(p["allowSharedKeyAccess"], false, "no key to steal");
    assert_eq!(p["networkAcls"]["defaultAction"], "Deny");

    let share = one(
        &template,
        "Microsoft.Storage/storageAccounts/fileServices/shares",
    );
    assert_eq!(share["properties"]["enabledProtocols"], "NFS");
    assert_eq!(share["properties"]["rootSquash"], "NoRootSquash");

    let endpoint = named(
        &template,
        "Microsoft.Network/privateEndpoints",
        "fileEndpointName",
    );
    let conn = &endpoint["properties"]["privateLinkServiceConnections"][0]["properties"];
    assert_eq!(conn["groupIds"], json!(["file"]));
    assert!(
        conn["privateLinkServiceId"]
            .as_str()
            .unwrap()
            .contains("storageAccountName")
    );
    assert_eq!(
        template["variables"]["fileDnsZone"],
        "[format('privatelink.file.{0}', environment().suffixes.storage)]"
    );
    named(
        &template,
        "Microsoft.Network/privateDnsZones/virtualNetworkLinks",
        "fileDnsZone",
    );
    named(
        &template,
        "Microsoft.Network/privateEndpoints/privateDnsZoneGroups",
        "fileEndpointName",
    );
    // No subnet reaches storage any other way.
    let vnet = one(&template, "Microsoft.Network/virtualNetworks").to_string();
    assert!(!vnet.contains("serviceEndpoints"), "{vnet}");

    // On the VM: NFS 4.1 at /home, root's 0755 (never world-writable), homes 0700.
    let pool = read(CLOUD_INIT[0]);
    let mount = written_file(&pool, "/usr/local/sbin/poolgate-mount-home");
    assert!(mount.contains("printf '%s /home nfs %s 0 0\\n' \"$remote\" \"$options\""));
    assert!(mount.contains("options=\"vers=4,minorversion=1,sec=sys,"));
    assert!(mount.contains("chown root:root /home") && mount.contains("chmod 0755 /home"));
    assert!(mount.contains("usermod --move-home --home \"$local_homes/$user\""));
    let users = written_file(&pool, "/usr/local/sbin/poolgate-pool-users");
    assert!(users.contains("mkdir -m 0700 \"/home/$name\""));
    assert!(users.contains("chown -R \"$uid:$uid\" \"/home/$name\""));
    for rel in CLOUD_INIT {
        assert!(
            !read(rel).contains("0777"),
            "{rel} makes something world-writable"
        );
    }
    // Logins wait for /home.
    for path in [
        "/etc/systemd/system/ssh.service.d/50-poolgate-home.conf",
        "/etc/systemd/system/ssh.socket.d/50-poolgate-home.conf",
    ] {
        assert!(written_file(&pool, path).contains("After=remote-fs.target"));
    }
    let hub = written_file(&pool, "/etc/systemd/system/poolgate-jupyterhub.service");
    assert!(hub.contains("RequiresMountsFor=/home"));
}

#[test]
fn pool_users_have_fixed_uids_from_the_scale_set_model() {
    require_tools!("bash");
    let Some(python) = python_with_yaml() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = extracted_script(
        &python,
        CLOUD_INIT[0],
        "/usr/local/sbin/poolgate-pool-users",
        dir.path(),
    );
    let check = |entries: &str| -> Output {
        run_with_timeout(
            Command::new(tool("bash"))
                .arg(&script)
                .args(["--check", entries]),
            TOOL_TIMEOUT,
        )
    };
    let out = check("alice:2001 bob:2002:bob@contoso.com");
    assert_success(&out, "poolgate-pool-users --check");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "alice 2001 -\nbob 2002 bob@contoso.com\n"
    );
    // Every bad entry is named, and nothing is planned for a broken list.
    let out = check("Alice:2001 carol:999 dave:2003 erin:2003 dave:2004 frank:2005:x:y");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "'Alice:2001': the name must be lower-case",
        "'carol:999': the uid must be a number from 2000",
        "uid 2003 is given to both dave and erin",
        "'dave' is listed twice",
        "'frank:2005:x:y': expected name:uid",
    ] {
        assert!(said.contains(needle), "{needle:?} not in:\n{said}");
    }
    // The example parameters pass, and the model (customData) carries them to every instance
    // the scale set creates — including the autoscaler's.
    let example = json("azure/azuredeploy.parameters.example.json");
    let users = example["parameters"]["poolUsers"]["value"]
        .as_str()
        .unwrap();
    assert_success(&check(users), "the example's poolUsers");
    let template = json("azure/azuredeploy.json");
    let vmss = one(&template, "Microsoft.Compute/virtualMachineScaleSets");
    let custom = vmss["properties"]["virtualMachineProfile"]["osProfile"]["customData"]
        .as_str()
        .unwrap();
    assert!(custom.contains("'__POOL_USERS__', parameters('poolUsers'))"));
    let pool = read(CLOUD_INIT[0]);
    let users_script = written_file(&pool, "/usr/local/sbin/poolgate-pool-users");
    for needle in [
        "groupadd --gid \"$uid\" \"$name\"",
        "useradd --uid \"$uid\" --gid \"$uid\"",
        "exists with uid $have, poolUsers says $uid; left alone",
        "chpasswd -e",
    ] {
        assert!(
            users_script.contains(needle),
            "pool users script lacks {needle:?}"
        );
    }
}

/// Runs the pool's jupyterhub_config.py against `env` (pool.env lines) with a stand-in for
/// traitlets' config object; prints the settings as JSON (callables: their answer for a
/// sample of claims).
fn jupyterhub_settings(dir: &Path, env: &str) -> Value {
    let Some(python) = python_with_yaml() else {
        return Value::Null;
    };
    let pool = read(CLOUD_INIT[0]);
    let files = write_files(&yaml(&python, &deploy_dir().join(CLOUD_INIT[0])));
    assert!(pool.contains("/etc/poolgate/jupyterhub_config.py"));
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("pool.env"), env).unwrap();
    std::fs::write(etc.join("jupyterhub_client_secret"), "s3cret\n").unwrap();
    let config = content(&files, "/etc/poolgate/jupyterhub_config.py")
        .replace("/etc/poolgate/", &format!("{}/", etc.display()));
    std::fs::write(dir.join("jupyterhub_config.py"), config).unwrap();
    let runner = r#"
import json, sys
class Section(dict):
    def __getattr__(self, name):
        return self.setdefault(name, Section())
    def __setattr__(self, name, value):
        self[name] = value
c = Section()
exec(open(sys.argv[1]).read(), {"get_config": lambda: c})
claims = [{"upn": "Bob@Contoso.com"}, {"unique_name": "mallory@contoso.com"}]
def plain(v):
    if callable(v):
        return [v(x) for x in claims]
    if isinstance(v, set):
        return sorted(v)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v
json.dump(plain(c), sys.stdout)
"#;
    let out = run_with_timeout(
        Command::new(python)
            .args(["-c", runner])
            .arg(dir.join("jupyterhub_config.py")),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "jupyterhub_config.py");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn jupyterhub_logs_users_in_with_entra_id_or_pam_on_a_fresh_vm() {
    let dir = tempfile::tempdir().unwrap();
    let env = "POOL_USERS=\"alice:2001 bob:2002:bob@contoso.com\"\n\
               JUPYTERHUB_AUTH=azuread\n\
               ENTRA_TENANT_ID=00000000-0000-0000-0000-000000000000\n\
               ENTRA_CLIENT_ID=11111111-1111-1111-1111-111111111111\n\
               PUBLIC_HOST=pool.example.org\n";
    let c = jupyterhub_settings(dir.path(), env);
    if c.is_null() {
        return;
    }
    assert_eq!(c["JupyterHub"]["bind_url"], "http://:8000");
    assert_eq!(c["JupyterHub"]["authenticator_class"], "azuread");
    let azure = &c["AzureAdOAuthenticator"];
    assert_eq!(azure["tenant_id"], "00000000-0000-0000-0000-000000000000");
    assert_eq!(azure["client_id"], "11111111-1111-1111-1111-111111111111");
    assert_eq!(
        azure["client_secret"], "s3cret",
        "read from the file, not the model"
    );
    assert_eq!(
        azure["oauth_callback_url"],
        "https://pool.example.org/hub/oauth_callback"
    );
    // bob's Entra name maps to the local account bob; an unmapped user is not allowed.
    assert_eq!(
        azure["username_claim"],
        json!(["bob", "mallory@contoso.com"])
    );
    assert_eq!(azure["allowed_users"], json!(["bob"]));

    let dir = tempfile::tempdir().unwrap();
    let c = jupyterhub_settings(
        dir.path(),
        "POOL_USERS=\"alice:2001 bob:2002\"\nJUPYTERHUB_AUTH=pam\n",
    );
    assert_eq!(c["JupyterHub"]["authenticator_class"], "pam");
    assert_eq!(c["Authenticator"]["allowed_users"], json!(["alice", "bob"]));

    // The template: parameters for tenant and client, the client secret only in Key Vault.
    let template = json("azure/azuredeploy.json");
    let params = &template["parameters"];
    assert_eq!(
        params["jupyterhubAuth"]["allowedValues"],
        json!(["azuread", "pam"])
    );
    for name in ["entraTenantId", "entraClientId"] {
        assert_eq!(params[name]["type"], "string", "{name}");
    }
    assert!(
        !params
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.to_ascii_lowercase().contains("secret")),
        "no secret is a parameter"
    );
    let vmss = one(&template, "Microsoft.Compute/virtualMachineScaleSets");
    let custom = vmss["properties"]["virtualMachineProfile"]["osProfile"]["customData"]
        .as_str()
        .unwrap();
    for needle in [
        "'__JUPYTERHUB_AUTH__', parameters('jupyterhubAuth'))",
        "'__ENTRA_TENANT_ID__', parameters('entraTenantId'))",
        "'__ENTRA_CLIENT_ID__', parameters('entraClientId'))",
        "'__PUBLIC_HOST__', if(empty(parameters('publicHostName'))",
    ] {
        assert!(custom.contains(needle), "customData lacks {needle}");
    }
    let pool = read(CLOUD_INIT[0]);
    let wrapper = written_file(&pool, "/usr/local/sbin/poolgate-jupyterhub");
    assert!(wrapper.contains("-m pip install --quiet 'oauthenticator[azuread]'"));
}

#[test]
fn every_resource_is_tagged_and_the_pool_has_zones_and_boot_diagnostics() {
    let template = json("azure/azuredeploy.json");
    assert_eq!(template["parameters"]["tags"]["type"], "object");
    // Types ARM gives no tags to (proxy resources and extension resources).
    let untaggable = [
        "Microsoft.Storage/storageAccounts/fileServices/shares",
        "Microsoft.Network/privateEndpoints/privateDnsZoneGroups",
        "Microsoft.Authorization/roleDefinitions",
        "Microsoft.Authorization/roleAssignments",
    ];
    for r in template["resources"].as_array().unwrap() {
        let kind = r["type"].as_str().unwrap();
        if untaggable.contains(&kind) {
            continue;
        }
        assert_eq!(
            r["tags"], "[parameters('tags')]",
            "{kind} {} has no tags",
            r["name"]
        );
    }
    let vmss = one(&template, "Microsoft.Compute/virtualMachineScaleSets");
    assert_eq!(
        vmss["zones"],
        "[if(empty(parameters('poolZones')), json('null'), parameters('poolZones'))]"
    );
    assert_eq!(
        template["parameters"]["poolZones"]["defaultValue"],
        json!(["1", "2", "3"])
    );
    let gateway = one(&template, "Microsoft.Compute/virtualMachines");
    assert_eq!(
        gateway["properties"]["diagnosticsProfile"]["bootDiagnostics"]["enabled"],
        true
    );
    assert_eq!(
        vmss["properties"]["virtualMachineProfile"]["diagnosticsProfile"]["bootDiagnostics"]["enabled"],
        true
    );
}

#[test]
fn operations_doc_and_the_deploy_name_the_same_admin_port() {
    let config: toml::Value = toml::from_str(&gateway_config_text()).unwrap();
    let port = config["listen"]["admin"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(port, ADMIN_PORT);
    let ops = std::fs::read_to_string(workspace_dir().join("docs/operations.md")).unwrap();
    assert!(
        ops.contains(&format!("127.0.0.1:{port}")),
        "docs/operations.md names the deploy's admin port {port}"
    );
    for (i, _) in ops.match_indices("localhost:") {
        let p: String = ops[i + "localhost:".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        assert_eq!(p, port, "docs/operations.md uses admin port {p}");
    }
    assert!(
        !ops.contains("127.0.0.1:9090") || ops.contains("poolgate's built-in default"),
        "9090 appears only as the built-in default"
    );
    let prometheus = read("prometheus/prometheus.yml");
    assert!(prometheus.contains(&format!("127.0.0.1:{port}")));
}

#[test]
fn a_re_created_gateway_gets_the_same_keys_users_and_certificate_back() {
    let gateway = read(CLOUD_INIT[1]);
    let fetch = written_file(&gateway, "/usr/local/sbin/poolgate-fetch-secrets");
    let config: toml::Value = toml::from_str(&gateway_config_text()).unwrap();
    // The replicas share state in Redis, so poolgate itself never generates the host key, user
    // CA or cookie secret: they can only come from the vault, the same on every (re-)created VM.
    assert_eq!(config["cluster"]["store"].as_str(), Some("redis"));
    for secret in [
        "poolgate-ssh-host-key",
        "poolgate-user-ca",
        "poolgate-cookie-secret",
    ] {
        assert!(fetch.contains(&format!("put {secret} ")), "{secret}");
    }
    let commands: Vec<&str> = gateway
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(
        !commands
            .iter()
            .any(|l| l.contains("keys init") || l.contains("ssh-keygen")),
        "nothing on the gateway VM makes a new poolgate key"
    );
    // Users (Key Vault, replacing the directory) and the TLS certificate (a Key Vault
    // certificate, PEM or PKCS#12) come back too.
    assert!(fetch.contains("/secrets/poolgate-authorized-keys?"));
    for needle in [
        "/secrets/poolgate-tls?api-version=7.4",
        "application/x-pkcs12",
        "chmod 0600 \"$new/key.pem\"",
        "mv -f \"$new/cert.pem\" \"$dir/cert.pem\"",
    ] {
        assert!(fetch.contains(needle), "fetch script lacks {needle:?}");
    }
    // The self-signed stand-in is made only when no certificate came from the vault.
    let setup = written_file(&gateway, "/usr/local/sbin/poolgate-gateway-setup");
    let fetched = setup
        .find("/usr/local/sbin/poolgate-fetch-secrets")
        .unwrap();
    let self_signed = setup
        .find("if [ ! -f /etc/poolgate/tls/cert.pem ]; then")
        .unwrap();
    assert!(fetched < self_signed);
    // The VMs' host keys are rebuilt from ARM (every instance's console), not from local state.
    assert!(
        written_file(&gateway, "/usr/local/sbin/poolgate-known-hosts")
            .contains("retrieveBootDiagnosticsData")
    );
}

#[test]
fn systemd_units_cloud_init_writes_pass_systemd_analyze_verify() {
    let Some(python) = python_with_yaml() else {
        return;
    };
    let Some(analyze) = find_tool("systemd-analyze") else {
        assert!(
            !in_ci(),
            "systemd-analyze is missing (Debian package systemd)"
        );
        eprintln!("systemd-analyze not installed: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for rel in CLOUD_INIT {
        let files = write_files(&yaml(&python, &deploy_dir().join(rel)));
        for (path, entry) in &files {
            let name = path.rsplit('/').next().unwrap();
            let is_unit = path.starts_with("/etc/systemd/system/")
                && !path.contains(".d/")
                && (name.ends_with(".service") || name.ends_with(".timer"))
                && name != "poolgate.service";
            if !is_unit {
                continue;
            }
            // Each ExecStart names a script cloud-init installs: point it at a copy of that
            // script here, so verify also checks the command exists and is executable.
            let mut unit = entry["content"].as_str().unwrap().to_string();
            for (script, body) in files.iter().filter(|(p, _)| p.starts_with("/usr/local/")) {
                if unit.contains(script.as_str()) {
                    let copy = dir.path().join(script.rsplit('/').next().unwrap());
                    std::fs::write(&copy, body["content"].as_str().unwrap()).unwrap();
                    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                        .unwrap();
                    unit = unit.replace(script.as_str(), &copy.display().to_string());
                }
            }
            let file = dir.path().join(name);
            std::fs::write(&file, unit).unwrap();
            units.push(file);
        }
    }
    assert!(units.len() >= 5, "{units:?}");
    let out = run_with_timeout(
        Command::new(analyze).arg("verify").args(&units),
        TOOL_TIMEOUT,
    );
    let said = text(&out);
    let ours = said
        .lines()
        .filter(|l| {
            units
                .iter()
                .any(|u| l.contains(&*u.file_name().unwrap().to_string_lossy()))
        })
        .collect::<Vec<_>>();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify on the cloud-init units:\n{said}"
    );
}

#[test]
fn a_key_vault_pem_certificate_splits_into_the_key_and_chain_poolgate_reads() {
    require_tools!("awk", "openssl");
    let gateway = read(CLOUD_INIT[1]);
    let fetch = written_file(&gateway, "/usr/local/sbin/poolgate-fetch-secrets");
    // The awk program poolgate-fetch-secrets runs on the PEM value of poolgate-tls.
    let (_, tls) = fetch
        .split_once("tls_certificate() {")
        .expect("fetch script has tls_certificate");
    let (_, rest) = tls
        .split_once("awk -v dir=\"$new\" '")
        .expect("fetch script splits the PEM bundle with awk");
    let program = &rest[..rest.find('\'').unwrap()];

    // A Key Vault PEM certificate: the private key first, then the chain.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("in-key.pem");
    let cert = dir.path().join("in-cert.pem");
    let out = run_with_timeout(
        Command::new(tool("openssl"))
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=pool.example.org", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "openssl req");
    let bundle = format!(
        "{}{}{}",
        std::fs::read_to_string(&key).unwrap(),
        std::fs::read_to_string(&cert).unwrap(),
        std::fs::read_to_string(&cert).unwrap()
    );
    let split = dir.path().join("split");
    std::fs::create_dir(&split).unwrap();
    let out = run_with_input(
        Command::new(tool("awk"))
            .arg("-v")
            .arg(format!("dir={}", split.display()))
            .arg(program),
        bundle.as_bytes(),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "the fetch script's awk");
    let key_out = std::fs::read_to_string(split.join("key.pem")).unwrap();
    let cert_out = std::fs::read_to_string(split.join("cert.pem")).unwrap();
    assert_eq!(key_out, std::fs::read_to_string(&key).unwrap());
    assert!(!cert_out.contains("PRIVATE"), "no key in cert.pem");
    assert_eq!(
        cert_out.matches("BEGIN CERTIFICATE").count(),
        2,
        "the whole chain"
    );
    let out = run_with_timeout(
        Command::new(tool("openssl"))
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(split.join("cert.pem")),
        TOOL_TIMEOUT,
    );
    assert_success(&out, "openssl x509 on cert.pem");
    assert!(text(&out).contains("pool.example.org"));
}

/// Batch jobs: one slurm.conf on the gateways and the pool VMs, slurmctld on gateway 0 only,
/// pool VMs joining as dynamic nodes named like their VM in poolgate, in the partition the
/// gateway's `[batch]` section names; the munge key comes from Key Vault, never customData.
#[test]
fn slurm_runs_on_gateway_0_and_pool_vms_join_as_dynamic_nodes() {
    let pool = read("cloud-init/pool-vm.yaml");
    let gateway = read("cloud-init/gateway.yaml");
    let conf = written_file(&pool, "/etc/slurm/slurm.conf");
    assert_eq!(
        conf,
        written_file(&gateway, "/etc/slurm/slurm.conf"),
        "the gateways and the pool VMs get the same slurm.conf"
    );
    for line in [
        "SlurmctldHost=__SLURMCTLD_HOST__",
        &format!("SlurmctldPort={SLURMCTLD_PORT}"),
        &format!("SlurmdPort={SLURMD_PORT}"),
        &format!("SrunPortRange={SRUN_PORTS}"),
        "AuthType=auth/munge",
        "ReturnToService=2",
        "NodeSet=pool Feature=pool",
        "PartitionName=pool Nodes=pool Default=YES LLN=YES OverSubscribe=EXCLUSIVE MaxTime=INFINITE State=UP",
    ] {
        assert!(
            conf.lines().any(|l| l.trim() == line),
            "slurm.conf lacks {line:?}:\n{conf}"
        );
    }
    assert!(!conf.contains("NodeName="), "no static node list: {conf}");

    // Both customData fill in gateway 0's host name, which is its computer name.
    let template = json("azure/azuredeploy.json");
    assert_eq!(
        template["variables"]["slurmctldHost"],
        "[format('{0}0', variables('gatewayNamePrefix'))]"
    );
    let gateway_vm = one(&template, "Microsoft.Compute/virtualMachines");
    assert_eq!(
        gateway_vm["properties"]["osProfile"]["computerName"],
        "[format('{0}{1}', variables('gatewayNamePrefix'), copyIndex())]"
    );
    let vmss = one(&template, "Microsoft.Compute/virtualMachineScaleSets");
    // ...and the cluster's one Slurm release (poolgate-slurm-install, below).
    for custom in [
        &gateway_vm["properties"]["osProfile"]["customData"],
        &vmss["properties"]["virtualMachineProfile"]["osProfile"]["customData"],
    ] {
        let custom = custom.as_str().unwrap();
        for filled in [
            "'__SLURMCTLD_HOST__', variables('slurmctldHost')",
            "'__SLURM_VERSION__', parameters('slurmVersion')",
        ] {
            assert!(custom.contains(filled), "{filled} in {custom}");
        }
    }

    // Pool VMs: slurmd as a dynamic node named like the VM (the metadata service's instance
    // name, which is the azure-vmss provider's VM name), with the partition's feature.
    let setup = written_file(&pool, "/usr/local/sbin/poolgate-slurm-setup");
    for needle in [
        "metadata/instance/compute/name",
        "SLURMD_OPTIONS=\"-Z -N %s --conf Feature=pool\"",
        "poolgate-vault-secret poolgate-munge-key",
        "systemctl restart slurmd.service",
    ] {
        assert!(
            setup.contains(needle),
            "poolgate-slurm-setup lacks {needle:?}"
        );
    }
    let runcmd = &pool[pool.find("\nruncmd:").unwrap()..];
    assert!(
        runcmd.find("poolgate-pool-users").unwrap()
            < runcmd.find("/usr/local/sbin/poolgate-slurm-setup").unwrap(),
        "accounts and /home before slurmd"
    );
    for yaml in [&pool, &gateway] {
        assert!(
            !yaml.contains("- path: /etc/munge/munge.key"),
            "the munge key is never in customData"
        );
    }

    // Gateways: the client commands everywhere, slurmctld where the host name says so.
    let controller = written_file(&gateway, "/usr/local/sbin/poolgate-slurm-controller");
    assert!(controller.contains("[ \"$(hostname -s)\" = \"$SLURMCTLD_HOST\" ] && role=controller"));
    assert!(controller.contains("systemctl restart slurmctld.service"));
    let setup = written_file(&gateway, "/usr/local/sbin/poolgate-gateway-setup");
    assert!(
        setup.find("poolgate-fetch-secrets").unwrap()
            < setup.find("poolgate-slurm-controller").unwrap()
    );
    assert!(
        written_file(&gateway, "/usr/local/sbin/poolgate-fetch-secrets")
            .contains("/secrets/poolgate-munge-key?api-version=7.4")
    );
    // Slurm itself comes from poolgate-slurm-install (one release everywhere), never from the
    // image's Ubuntu archive; the controller's unit runs as SlurmUser.
    for (yaml, role) in [(&gateway, "\"$role\""), (&pool, "node")] {
        let packages =
            &yaml[yaml.find("\npackages:").unwrap()..yaml.find("\nwrite_files:").unwrap()];
        assert!(packages.contains("- munge"), "{packages}");
        assert!(!packages.contains("slurm"), "{packages}");
        assert!(
            yaml.contains(&format!(
                "/usr/local/sbin/poolgate-slurm-install {role} \"$SLURM_VERSION\""
            )),
            "{role}"
        );
        assert!(
            written_file(
                yaml,
                &format!(
                    "/etc/poolgate/{}.env",
                    if role == "node" { "pool" } else { "gateway" }
                )
            )
            .contains("SLURM_VERSION=__SLURM_VERSION__")
        );
    }
    let unit = written_file(
        &gateway,
        "/etc/systemd/system/slurmctld.service.d/50-poolgate.conf",
    );
    assert!(
        unit.contains("      User=poolgate\n      Group=poolgate\n"),
        "{unit}"
    );
    let version = template["parameters"]["slurmVersion"]["defaultValue"]
        .as_str()
        .unwrap();
    assert!(
        version.len() == 5
            && version.as_bytes()[2] == b'.'
            && version.replace('.', "").bytes().all(|b| b.is_ascii_digit()),
        "slurmVersion is a release like 25.11: {version}"
    );

    // The gateway's [batch] section names the partition and maps node names to VM names.
    let config = gateway_config_text();
    let batch = &config[config.find("\n[batch]\n").expect("a [batch] section")..];
    for line in [
        "engine = \"slurm\"",
        "partition = \"pool\"",
        "node_name = \"{vm}\"",
    ] {
        assert!(batch.contains(line), "[batch] lacks {line:?}: {batch}");
    }
}

/// Stub package tools for `poolgate-slurm-install`: they log every call to `$STATE/calls` and
/// play a repository that serves `$STATE/available` (one version) and a dpkg database in
/// `$STATE/installed` ("package version" lines).
const SLURM_INSTALL_STUBS: [(&str, &str); 6] = [
    (
        "dpkg-query",
        r#"#!/bin/bash
echo "dpkg-query $*" >>"$STATE/calls"
package=${!#}
version=$(awk -v p="$package" '$1 == p { print $2 }' "$STATE/installed" 2>/dev/null)
[ -n "$version" ] || exit 1
case "$*" in *Status*) echo "installed $version" ;; *) echo "$version" ;; esac
"#,
    ),
    (
        "dpkg",
        r#"#!/bin/bash
echo "dpkg $*" >>"$STATE/calls"
case "$1" in
  --print-architecture) echo amd64 ;;
  -i)
    . /etc/os-release
    case "$VERSION_CODENAME" in
      jammy) echo key >/etc/apt/trusted.gpg.d/microsoft-prod.gpg ;;
      *) echo key >/usr/share/keyrings/microsoft-prod.gpg ;;
    esac
    ;;
esac
"#,
    ),
    (
        "curl",
        r#"#!/bin/bash
echo "curl $*" >>"$STATE/calls"
while [ $# -gt 0 ]; do
  [ "$1" = -o ] && echo deb >"$2"
  shift
done
"#,
    ),
    (
        "apt-get",
        r#"#!/bin/bash
echo "apt-get $*" >>"$STATE/calls"
available=$(cat "$STATE/available")
for arg in "$@"; do
  case "$arg" in
    slurm*=*)
      wanted=${arg#*=}
      # shellcheck disable=SC2053
      [[ $available == $wanted ]] || { echo "E: Version '$wanted' for '${arg%%=*}' was not found" >&2; exit 100; }
      echo "${arg%%=*} $available" >>"$STATE/installed"
      ;;
  esac
done
"#,
    ),
    (
        "apt-mark",
        "#!/bin/bash\necho \"apt-mark $*\" >>\"$STATE/calls\"\n",
    ),
    ("sleep", "#!/bin/bash\nexit 0\n"),
];

/// The deploy puts one Slurm release on both gateways and every pool VM, from Microsoft's Slurm
/// repository for the VM's Ubuntu, pinned and held — Ubuntu's own archives would give the pool
/// (22.04) Slurm 21.08 and the gateways (24.04) 23.11, which never run a batch job together.
/// The script runs for real, in a private mount namespace (its own /etc/apt, keyrings and
/// os-release) with stub package tools, so it touches neither this machine nor the network.
#[test]
fn slurm_install_puts_one_release_from_microsofts_repository_on_every_vm() {
    require_tools!("bash", "unshare");
    let Some(python) = python_with_yaml() else {
        return;
    };
    assert_eq!(
        written_file(
            &read(CLOUD_INIT[0]),
            "/usr/local/sbin/poolgate-slurm-install"
        ),
        written_file(
            &read(CLOUD_INIT[1]),
            "/usr/local/sbin/poolgate-slurm-install"
        ),
        "the gateways and the pool VMs install Slurm with the same script"
    );
    let dir = tempfile::tempdir().unwrap();
    let script = extracted_script(
        &python,
        CLOUD_INIT[0],
        "/usr/local/sbin/poolgate-slurm-install",
        dir.path(),
    );
    let stubs = dir.path().join("stubs");
    std::fs::create_dir(&stubs).unwrap();
    for (name, body) in SLURM_INSTALL_STUBS {
        let path = stubs.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Inside the namespace: fresh /etc/apt and keyrings, this case's os-release, then the script.
    let jail = r#"set -e
mount -t tmpfs tmpfs /etc/apt
mkdir -p /etc/apt/sources.list.d /etc/apt/preferences.d /etc/apt/trusted.gpg.d
mount -t tmpfs tmpfs /usr/share/keyrings
mount --bind "$STATE/os-release" /etc/os-release
[ -z "$KEY_AT" ] || echo key >"$KEY_AT"
rc=0
PATH="$STUBS:$PATH" bash "$SCRIPT" "$@" || rc=$?
cp /etc/apt/sources.list.d/* /etc/apt/preferences.d/* "$STATE/" 2>/dev/null || true
exit "$rc"
"#;
    struct Case {
        state: PathBuf,
    }
    impl Case {
        fn file(&self, name: &str) -> String {
            std::fs::read_to_string(self.state.join(name)).unwrap_or_default()
        }
    }
    let new_case = |name: &str, os: &str, available: &str| -> Case {
        let state = dir.path().join(name);
        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("os-release"), os).unwrap();
        std::fs::write(state.join("available"), available).unwrap();
        Case { state }
    };
    let run = |case: &Case, key_at: &str, args: &[&str]| -> Output {
        run_with_timeout(
            Command::new(tool("unshare"))
                .args(["--mount", "--map-root-user", "--propagation", "private"])
                .args([tool("bash").to_str().unwrap(), "-c", jail, "jail"])
                .args(args)
                .env("STATE", &case.state)
                .env("STUBS", &stubs)
                .env("SCRIPT", &script)
                .env("KEY_AT", key_at),
            TOOL_TIMEOUT,
        )
    };
    const JAMMY: &str =
        "PRETTY_NAME=\"Ubuntu 22.04.5 LTS\"\nVERSION_ID=\"22.04\"\nVERSION_CODENAME=jammy\n";
    const NOBLE: &str =
        "PRETTY_NAME=\"Ubuntu 24.04.3 LTS\"\nVERSION_ID=\"24.04\"\nVERSION_CODENAME=noble\n";

    // A pool VM (the 22.04 Data Science VM) without Microsoft's key: the key package first,
    // then slurmd of the cluster's release, pinned and held.
    let pool = new_case("pool", JAMMY, "25.11.5-1");
    let out = run(&pool, "", &["node", "25.11"]);
    assert_success(&out, "poolgate-slurm-install node 25.11 on 22.04");
    let calls = pool.file("calls");
    assert!(
        calls.contains("curl -fsSL --retry 5 --max-time 120 -o /tmp/tmp.",)
            && calls.contains(
                "https://packages.microsoft.com/config/ubuntu/22.04/packages-microsoft-prod.deb"
            ),
        "{calls}"
    );
    assert!(calls.contains("dpkg -i "), "{calls}");
    assert_eq!(
        pool.file("poolgate-slurm.list"),
        "deb [arch=amd64 signed-by=/etc/apt/trusted.gpg.d/microsoft-prod.gpg] https://packages.microsoft.com/repos/slurm-ubuntu-jammy/ stable main\n"
    );
    let pin = pool.file("poolgate-slurm");
    assert!(
        pin.contains("Package: slurm-smd*\nPin: version 25.11.*\nPin-Priority: 1001\n"),
        "{pin}"
    );
    assert!(
        calls.contains(
            "apt-get -q -o DPkg::Lock::Timeout=600 install -y --allow-change-held-packages slurm-smd=25.11.* slurm-smd-client=25.11.* slurm-smd-slurmd=25.11.*\n"
        ),
        "{calls}"
    );
    assert!(
        calls.contains("apt-mark hold slurm-smd slurm-smd-client slurm-smd-slurmd\n"),
        "{calls}"
    );
    assert!(text(&out).contains("Slurm 25.11.5-1 (node) installed from packages.microsoft.com"));
    // Started again (the disk kept): nothing to do, no package tool run.
    std::fs::remove_file(pool.state.join("calls")).unwrap();
    let out = run(&pool, "", &["node", "25.11"]);
    assert_success(&out, "poolgate-slurm-install again");
    assert!(text(&out).contains("Slurm 25.11 (node) is installed"));
    let calls = pool.file("calls");
    assert!(
        !calls.contains("apt-get") && !calls.contains("curl"),
        "{calls}"
    );

    // Gateway 0 (Ubuntu 24.04, the key already there): the same release, with slurmctld.
    let gateway = new_case("gateway", NOBLE, "25.11.5-1");
    let out = run(
        &gateway,
        "/usr/share/keyrings/microsoft-prod.gpg",
        &["controller", "25.11"],
    );
    assert_success(&out, "poolgate-slurm-install controller 25.11 on 24.04");
    let calls = gateway.file("calls");
    assert!(!calls.contains("curl"), "the image's key is used: {calls}");
    assert_eq!(
        gateway.file("poolgate-slurm.list"),
        "deb [arch=amd64 signed-by=/usr/share/keyrings/microsoft-prod.gpg] https://packages.microsoft.com/repos/slurm-ubuntu-noble/ stable main\n"
    );
    assert!(
        calls.contains(
            "install -y --allow-change-held-packages slurm-smd=25.11.* slurm-smd-client=25.11.* slurm-smd-slurmctld=25.11.*\n"
        ),
        "{calls}"
    );

    // A release the repository does not serve: a failure that says what to check.
    let absent = new_case("absent", NOBLE, "25.11.5-1");
    let out = run(
        &absent,
        "/usr/share/keyrings/microsoft-prod.gpg",
        &["client", "24.05"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("could not install Slurm 24.05"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("apt-cache madison slurm-smd"));
    assert!(!absent.file("calls").contains("apt-mark"));

    // An image the repository has no Slurm for keeps its own, said once; a bad release is refused.
    let other = new_case(
        "other",
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n",
        "25.11.5-1",
    );
    let out = run(&other, "", &["node", "25.11"]);
    assert_success(&out, "poolgate-slurm-install on Debian");
    assert!(
        text(&out).contains("no Slurm for Debian GNU/Linux 12 (bookworm)"),
        "{}",
        text(&out)
    );
    assert!(!other.file("calls").contains("apt-get"));
    let out = run(&other, "", &["node", "latest"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("'latest' is not a Slurm release such as 25.11"));
}
