//! An in-process fake of the ARM endpoints the provider uses, plus a managed-identity token
//! endpoint, on 127.0.0.1:0. It keeps a little scale-set state, answers in the documented JSON
//! shapes, runs long operations over several polls, and logs every request for assertions.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const SUB: &str = "00000000-0000-0000-0000-000000000001";
pub const RG: &str = "rg-pool";
pub const VMSS: &str = "dsvm";
pub const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// One VM of the fake scale set.
#[derive(Debug, Clone)]
pub struct Inst {
    pub power: String,
    pub provisioning: String,
    pub protect: bool,
    pub ip: String,
}

/// One request the fake saw.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub body: Option<Value>,
    pub auth: Option<String>,
}

#[derive(Debug)]
enum Effect {
    Capacity(u32),
    Power(Vec<u32>, &'static str),
    Delete(Vec<u32>),
    Nothing,
}

#[derive(Debug)]
struct Op {
    polls_left: u32,
    effect: Option<Effect>,
}

/// The fake's state; tests set it up and inspect it.
#[derive(Debug)]
pub struct State {
    pub flexible: bool,
    pub capacity: u32,
    pub next_id: u32,
    pub instances: BTreeMap<u32, Inst>,
    /// Polls an operation takes (it succeeds on this poll).
    pub polls_per_op: u32,
    /// Answer long operations with `Location` only (no `Azure-AsyncOperation`).
    pub location_only: bool,
    /// The next this-many ARM requests get 429 with `Retry-After: 1`.
    pub throttle_next: u32,
    /// The next ARM request fails with this status, code and message.
    pub fail_next: Option<(u16, &'static str, &'static str)>,
    /// Long operations end `Failed` with this code and message.
    pub op_failure: Option<(&'static str, &'static str)>,
    /// Lifetime of issued tokens, in seconds.
    pub token_lifetime: u64,
    pub tokens_issued: Vec<String>,
    /// Instances per page of the instance listing.
    pub page_size: usize,
    /// Point `nextLink` at another host (ARM never does; the provider must not follow it).
    pub foreign_next_link: bool,
    pub log: Vec<Logged>,
    ops: HashMap<String, Op>,
    next_op: u32,
    addr: String,
}

impl State {
    fn new(count: u32) -> Self {
        let mut instances = BTreeMap::new();
        for id in 0..count {
            instances.insert(id, running(id));
        }
        Self {
            flexible: false,
            capacity: count,
            next_id: count,
            instances,
            polls_per_op: 2,
            location_only: false,
            throttle_next: 0,
            fail_next: None,
            op_failure: None,
            token_lifetime: 3600,
            tokens_issued: Vec::new(),
            page_size: 100,
            foreign_next_link: false,
            log: Vec::new(),
            ops: HashMap::new(),
            next_op: 0,
            addr: String::new(),
        }
    }

    /// ARM requests (not token requests) in order.
    pub fn arm_log(&self) -> Vec<Logged> {
        self.log
            .iter()
            .filter(|l| l.path != TOKEN_PATH)
            .cloned()
            .collect()
    }

    /// Number of token requests.
    pub fn token_requests(&self) -> usize {
        self.log.iter().filter(|l| l.path == TOKEN_PATH).count()
    }
}

fn running(id: u32) -> Inst {
    Inst {
        power: "running".into(),
        provisioning: "Succeeded".into(),
        protect: false,
        ip: format!("10.0.0.{}", id + 4),
    }
}

/// The running fake.
pub struct FakeArm {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FakeArm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn vmss_path() -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachineScaleSets/{VMSS}"
    )
}

fn group_path() -> String {
    format!("/subscriptions/{SUB}/resourceGroups/{RG}")
}

fn flex_name(id: u32) -> String {
    format!("{VMSS}_{id:08x}")
}

fn flex_id(name: &str) -> Option<u32> {
    u32::from_str_radix(name.strip_prefix(&format!("{VMSS}_"))?, 16).ok()
}

impl FakeArm {
    /// A fake scale set with `count` running instances, adjusted by `setup`.
    pub async fn start(count: u32, setup: impl FnOnce(&mut State)) -> Self {
        let mut state = State::new(count);
        setup(&mut state);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        state.addr = format!("http://{addr}");
        let state = Arc::new(Mutex::new(state));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake state")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_map(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn reply(status: u16, body: Value, headers: &[(&str, String)]) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json; charset=utf-8");
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    let bytes = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    builder
        .body(Full::new(bytes))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn arm_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        json!({"error": {"code": code, "message": message}}),
        &[],
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = query_map(req.uri().query().unwrap_or(""));
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let metadata = req
        .headers()
        .get("metadata")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Option<Value> = serde_json::from_slice(&body).ok();
    let Ok(mut s) = state.lock() else {
        return arm_error(500, "FakePoisoned", "fake state poisoned");
    };
    s.log.push(Logged {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
        auth: auth.clone(),
    });
    if path == TOKEN_PATH {
        return token(&mut s, &query, metadata.as_deref());
    }
    let valid = auth
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| s.tokens_issued.iter().any(|i| i == t));
    if !valid {
        return arm_error(
            401,
            "InvalidAuthenticationToken",
            "The access token is invalid.",
        );
    }
    if s.throttle_next > 0 {
        s.throttle_next -= 1;
        return reply(
            429,
            json!({"error": {"code": "TooManyRequests", "message": "The request is being throttled as the limit has been reached for operation group 'VMScaleSetBatchedVMRequests2Min'."}}),
            &[("retry-after", "1".into())],
        );
    }
    if let Some((status, code, message)) = s.fail_next.take() {
        return arm_error(status, code, message);
    }
    if path.contains("/operations/") {
        return poll(&mut s, &path);
    }
    if query.get("api-version").is_none_or(String::is_empty) {
        return arm_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }
    route(&mut s, &method, &path, &query, body.as_ref())
}

fn token(
    s: &mut State,
    query: &HashMap<String, String>,
    metadata: Option<&str>,
) -> Response<Full<Bytes>> {
    if metadata != Some("true")
        || query.get("resource").map(String::as_str) != Some("https://management.azure.com")
        || query.get("api-version").is_none()
    {
        return reply(
            400,
            json!({"error": "invalid_request", "error_description": "Required metadata header not specified"}),
            &[],
        );
    }
    let token = format!("tok-{}", s.tokens_issued.len() + 1);
    s.tokens_issued.push(token.clone());
    let expires_on = now() + s.token_lifetime;
    reply(
        200,
        json!({
            "access_token": token,
            "client_id": "11111111-1111-1111-1111-111111111111",
            "expires_in": s.token_lifetime.to_string(),
            "expires_on": expires_on.to_string(),
            "ext_expires_in": s.token_lifetime.to_string(),
            "not_before": now().to_string(),
            "resource": "https://management.azure.com",
            "token_type": "Bearer"
        }),
        &[],
    )
}

fn instance_json(s: &State, id: u32, inst: &Inst, expand: bool) -> Value {
    let mut properties = json!({
        "latestModelApplied": true,
        "provisioningState": inst.provisioning,
        "hardwareProfile": {"vmSize": "Standard_D4s_v5"},
        "osProfile": {"computerName": format!("{VMSS}{id:06}"), "adminUsername": "azureuser"},
        "protectionPolicy": {"protectFromScaleIn": inst.protect, "protectFromScaleSetActions": false},
    });
    if expand {
        let mut statuses = vec![json!({
            "code": format!("ProvisioningState/{}", inst.provisioning.to_lowercase()),
            "level": "Info",
            "displayStatus": format!("Provisioning {}", inst.provisioning.to_lowercase()),
        })];
        if !inst.power.is_empty() {
            statuses.push(json!({
                "code": format!("PowerState/{}", inst.power),
                "level": "Info",
                "displayStatus": format!("VM {}", inst.power),
            }));
        }
        properties["instanceView"] = json!({"platformUpdateDomain": 0, "statuses": statuses});
    }
    if s.flexible {
        properties["virtualMachineScaleSet"] = json!({"id": vmss_path()});
        properties["networkProfile"] = json!({"networkInterfaces": [{"id": format!("{}/providers/Microsoft.Network/networkInterfaces/{}-nic", group_path(), flex_name(id))}]});
        json!({
            "name": flex_name(id),
            "id": format!("{}/providers/Microsoft.Compute/virtualMachines/{}", group_path(), flex_name(id)),
            "type": "Microsoft.Compute/virtualMachines",
            "location": "westeurope",
            "properties": properties,
        })
    } else {
        json!({
            "name": format!("{VMSS}_{id}"),
            "instanceId": id.to_string(),
            "id": format!("{}/virtualMachines/{id}", vmss_path()),
            "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
            "location": "westeurope",
            "sku": {"name": "Standard_D4s_v5", "tier": "Standard"},
            "properties": properties,
        })
    }
}

fn nic_json(s: &State, id: u32, inst: &Inst) -> Value {
    let (vm_id, nic_id) = if s.flexible {
        let vm = format!(
            "{}/providers/Microsoft.Compute/virtualMachines/{}",
            group_path(),
            flex_name(id)
        );
        (
            vm,
            format!(
                "{}/providers/Microsoft.Network/networkInterfaces/{}-nic",
                group_path(),
                flex_name(id)
            ),
        )
    } else {
        let vm = format!("{}/virtualMachines/{id}", vmss_path());
        (vm.clone(), format!("{vm}/networkInterfaces/{VMSS}-nic"))
    };
    json!({
        "name": format!("{VMSS}-nic"),
        "id": nic_id,
        "properties": {
            "provisioningState": "Succeeded",
            "primary": true,
            "ipConfigurations": [{
                "name": "ipconfig1",
                "id": format!("{nic_id}/ipConfigurations/ipconfig1"),
                "properties": {
                    "privateIPAddress": inst.ip,
                    "privateIPAllocationMethod": "Dynamic",
                    "privateIPAddressVersion": "IPv4",
                    "primary": true
                }
            }],
            "virtualMachine": {"id": vm_id}
        }
    })
}

fn scale_set_json(s: &State) -> Value {
    json!({
        "name": VMSS,
        "id": vmss_path(),
        "type": "Microsoft.Compute/virtualMachineScaleSets",
        "location": "westeurope",
        "sku": {"name": "Standard_D4s_v5", "tier": "Standard", "capacity": s.capacity},
        "properties": {
            "orchestrationMode": if s.flexible { "Flexible" } else { "Uniform" },
            "overprovision": false,
            "provisioningState": "Succeeded",
            "upgradePolicy": {"mode": "Manual"}
        }
    })
}

/// Registers a long operation and answers 202 (or 200 for PATCH/PUT) with its headers.
fn accepted(s: &mut State, status: u16, body: Value, effect: Effect) -> Response<Full<Bytes>> {
    s.next_op += 1;
    let id = format!("op-{}", s.next_op);
    s.ops.insert(
        id.clone(),
        Op {
            polls_left: s.polls_per_op,
            effect: Some(effect),
        },
    );
    let url = format!(
        "{}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/westeurope/operations/{id}?api-version=2024-07-01",
        s.addr
    );
    if s.location_only {
        let location = format!("{url}&monitor=true");
        return reply(
            202,
            Value::Null,
            &[("location", location), ("retry-after", "1".into())],
        );
    }
    let location = format!("{url}&monitor=true");
    reply(
        status,
        body,
        &[
            ("azure-asyncoperation", url),
            ("location", location),
            ("retry-after", "1".into()),
        ],
    )
}

fn apply(s: &mut State, effect: Effect) {
    match effect {
        Effect::Capacity(target) => {
            while s.capacity < target {
                let id = s.next_id;
                s.next_id += 1;
                s.instances.insert(id, running(id));
                s.capacity += 1;
            }
            while s.capacity > target {
                // What Azure does when capacity is lowered: it picks the victims.
                if let Some((&id, _)) = s.instances.iter().next_back() {
                    s.instances.remove(&id);
                }
                s.capacity -= 1;
            }
        }
        Effect::Power(ids, power) => {
            for id in ids {
                if let Some(inst) = s.instances.get_mut(&id) {
                    inst.power = power.to_owned();
                    inst.provisioning = "Succeeded".into();
                }
            }
        }
        Effect::Delete(ids) => {
            for id in ids {
                if s.instances.remove(&id).is_some() {
                    s.capacity = s.capacity.saturating_sub(1);
                }
            }
        }
        Effect::Nothing => {}
    }
}

fn poll(s: &mut State, path: &str) -> Response<Full<Bytes>> {
    let id = path.rsplit('/').next().unwrap_or_default().to_owned();
    let location_only = s.location_only;
    let Some(op) = s.ops.get_mut(&id) else {
        return arm_error(404, "NotFound", "no such operation");
    };
    op.polls_left = op.polls_left.saturating_sub(1);
    if op.polls_left > 0 {
        return if location_only {
            reply(202, Value::Null, &[("retry-after", "1".into())])
        } else {
            reply(
                200,
                json!({"name": id, "status": "InProgress", "startTime": "2026-11-27T08:00:00Z"}),
                &[("retry-after", "1".into())],
            )
        };
    }
    let effect = op.effect.take();
    if let Some((code, message)) = s.op_failure {
        return reply(
            200,
            json!({"name": id, "status": "Failed", "error": {"code": code, "message": message}}),
            &[],
        );
    }
    if let Some(effect) = effect {
        apply(s, effect);
    }
    if location_only {
        reply(200, Value::Null, &[])
    } else {
        reply(
            200,
            json!({"name": id, "status": "Succeeded", "startTime": "2026-11-27T08:00:00Z", "endTime": "2026-11-27T08:01:00Z"}),
            &[],
        )
    }
}

#[allow(clippy::result_large_err)]
fn instance_ids(s: &State, body: Option<&Value>) -> Result<Vec<u32>, Response<Full<Bytes>>> {
    let Some(ids) = body
        .and_then(|b| b.get("instanceIds"))
        .and_then(Value::as_array)
    else {
        return Err(arm_error(
            400,
            "InvalidParameter",
            "instanceIds is required.",
        ));
    };
    let mut out = Vec::new();
    for id in ids {
        let parsed = id.as_str().and_then(|i| i.parse::<u32>().ok());
        match parsed {
            Some(n) if s.instances.contains_key(&n) => out.push(n),
            _ => {
                return Err(arm_error(
                    400,
                    "InvalidParameter",
                    "The provided instanceId is not an active Virtual Machine Scale Set VM instanceId.",
                ));
            }
        }
    }
    Ok(out)
}

fn set_power_now(s: &mut State, ids: &[u32], power: &str, provisioning: &str) {
    for id in ids {
        if let Some(inst) = s.instances.get_mut(id) {
            inst.power = power.to_owned();
            inst.provisioning = provisioning.to_owned();
        }
    }
}

fn route(
    s: &mut State,
    method: &str,
    path: &str,
    query: &HashMap<String, String>,
    body: Option<&Value>,
) -> Response<Full<Bytes>> {
    let vmss = vmss_path();
    let expand = query.get("$expand").map(String::as_str) == Some("instanceView");
    if path == vmss {
        return match method {
            "GET" => reply(200, scale_set_json(s), &[]),
            "PATCH" => {
                let Some(capacity) = body
                    .and_then(|b| b.pointer("/sku/capacity"))
                    .and_then(Value::as_u64)
                else {
                    return arm_error(400, "InvalidParameter", "sku.capacity is required.");
                };
                let target = u32::try_from(capacity).unwrap_or(u32::MAX);
                let mut answer = scale_set_json(s);
                answer["properties"]["provisioningState"] = json!("Updating");
                answer["sku"]["capacity"] = json!(target);
                accepted(s, 200, answer, Effect::Capacity(target))
            }
            _ => arm_error(405, "MethodNotAllowed", "no"),
        };
    }
    if let Some(rest) = path.strip_prefix(&format!("{vmss}/")) {
        return match (method, rest) {
            ("GET", "virtualMachines") if !s.flexible => {
                let skip: usize = query
                    .get("$skiptoken")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                let all: Vec<Value> = s
                    .instances
                    .iter()
                    .map(|(id, inst)| instance_json(s, *id, inst, expand))
                    .collect();
                let page: Vec<Value> = all.iter().skip(skip).take(s.page_size).cloned().collect();
                let mut answer = json!({"value": page});
                if skip + s.page_size < all.len() {
                    let host = if s.foreign_next_link {
                        "http://203.0.113.7".to_owned()
                    } else {
                        s.addr.clone()
                    };
                    answer["nextLink"] = json!(format!(
                        "{host}{vmss}/virtualMachines?$expand=instanceView&api-version={}&$skiptoken={}",
                        query.get("api-version").cloned().unwrap_or_default(),
                        skip + s.page_size
                    ));
                }
                reply(200, answer, &[])
            }
            ("GET", "networkInterfaces") if !s.flexible => {
                if query.get("api-version").map(String::as_str) != Some("2018-10-01") {
                    return arm_error(
                        400,
                        "NoRegisteredProviderFound",
                        "No registered resource provider found for this api-version.",
                    );
                }
                let nics: Vec<Value> = s
                    .instances
                    .iter()
                    .filter(|(_, i)| !i.ip.is_empty())
                    .map(|(id, inst)| nic_json(s, *id, inst))
                    .collect();
                reply(200, json!({"value": nics}), &[])
            }
            ("POST", "start" | "deallocate" | "delete") if !s.flexible => {
                let ids = match instance_ids(s, body) {
                    Ok(ids) => ids,
                    Err(response) => return response,
                };
                let effect = match rest {
                    "start" => {
                        set_power_now(s, &ids, "starting", "Updating");
                        Effect::Power(ids, "running")
                    }
                    "deallocate" => {
                        set_power_now(s, &ids, "deallocating", "Updating");
                        Effect::Power(ids, "deallocated")
                    }
                    _ => {
                        for id in &ids {
                            if let Some(inst) = s.instances.get_mut(id) {
                                inst.provisioning = "Deleting".into();
                            }
                        }
                        Effect::Delete(ids)
                    }
                };
                accepted(s, 202, Value::Null, effect)
            }
            (m, other) if other.starts_with("virtualMachines/") && !s.flexible => {
                let id = other
                    .trim_start_matches("virtualMachines/")
                    .parse::<u32>()
                    .ok();
                let Some((id, inst)) =
                    id.and_then(|id| s.instances.get(&id).cloned().map(|i| (id, i)))
                else {
                    return arm_error(404, "NotFound", "The entity was not found.");
                };
                match m {
                    "GET" => reply(200, instance_json(s, id, &inst, expand), &[]),
                    "PUT" => {
                        let protect = body
                            .and_then(|b| {
                                b.pointer("/properties/protectionPolicy/protectFromScaleIn")
                            })
                            .and_then(Value::as_bool);
                        if body
                            .and_then(|b| b.pointer("/properties/instanceView"))
                            .is_some()
                        {
                            return arm_error(
                                400,
                                "InvalidParameter",
                                "instanceView is read-only.",
                            );
                        }
                        if let (Some(p), Some(i)) = (protect, s.instances.get_mut(&id)) {
                            i.protect = p;
                        }
                        let answer = instance_json(s, id, &inst, false);
                        accepted(s, 200, answer, Effect::Nothing)
                    }
                    _ => arm_error(405, "MethodNotAllowed", "no"),
                }
            }
            _ => arm_error(404, "NotFound", "no such route in the fake"),
        };
    }
    let vms = format!(
        "{}/providers/Microsoft.Compute/virtualMachines",
        group_path()
    );
    if s.flexible && path == vms && method == "GET" {
        let wanted = format!("virtualMachineScaleSet/id eq '{vmss}'");
        if query.get("$filter") != Some(&wanted) || !expand {
            return arm_error(
                400,
                "InvalidParameter",
                "fake expects the scale-set $filter with $expand=instanceView",
            );
        }
        let value: Vec<Value> = s
            .instances
            .iter()
            .map(|(id, inst)| instance_json(s, *id, inst, true))
            .collect();
        return reply(200, json!({"value": value}), &[]);
    }
    if s.flexible
        && path
            == format!(
                "{}/providers/Microsoft.Network/networkInterfaces",
                group_path()
            )
        && method == "GET"
    {
        let nics: Vec<Value> = s
            .instances
            .iter()
            .filter(|(_, i)| !i.ip.is_empty())
            .map(|(id, inst)| nic_json(s, *id, inst))
            .collect();
        return reply(200, json!({"value": nics}), &[]);
    }
    if let Some(rest) = path.strip_prefix(&format!("{vms}/"))
        && s.flexible
    {
        let (name, action) = rest.split_once('/').unwrap_or((rest, ""));
        let Some(id) = flex_id(name).filter(|id| s.instances.contains_key(id)) else {
            return arm_error(404, "ResourceNotFound", "The Resource was not found.");
        };
        return match (method, action) {
            ("POST", "start") => {
                set_power_now(s, &[id], "starting", "Updating");
                accepted(s, 202, Value::Null, Effect::Power(vec![id], "running"))
            }
            ("POST", "deallocate") => {
                set_power_now(s, &[id], "deallocating", "Updating");
                accepted(s, 202, Value::Null, Effect::Power(vec![id], "deallocated"))
            }
            ("DELETE", "") => {
                if let Some(inst) = s.instances.get_mut(&id) {
                    inst.provisioning = "Deleting".into();
                }
                accepted(s, 202, Value::Null, Effect::Delete(vec![id]))
            }
            _ => arm_error(405, "MethodNotAllowed", "no"),
        };
    }
    arm_error(
        404,
        "ResourceNotFound",
        &format!("The Resource '{path}' under resource group '{RG}' was not found."),
    )
}
