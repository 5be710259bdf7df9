//! The fake's answers: ARM's JSON shapes for scale sets, instances, NICs and operations, and
//! the state changes each call makes.

use std::collections::HashMap;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use serde_json::{Value, json};

use super::{
    Effect, Inst, Op, RG, SUB, State, VMSS, arm_error, flex_id, flex_name, group_path, reply,
    running, vmss_path,
};

fn instance_json(s: &State, id: u32, inst: &Inst, expand: bool) -> Value {
    let mut properties = json!({
        "latestModelApplied": true,
        "provisioningState": inst.provisioning,
        "hardwareProfile": {"vmSize": "Standard_D4s_v5"},
        "osProfile": {"computerName": format!("{VMSS}{id:06}"), "adminUsername": "azureuser"},
        "protectionPolicy": {"protectFromScaleIn": inst.protect, "protectFromScaleSetActions": false},
    });
    if expand {
        // A failed provisioning carries its error code and message in the instance view
        // (`ProvisioningState/failed/{code}`, level Error), as Microsoft's REST article
        // "Virtual machine state information" shows.
        let mut statuses = vec![if inst.provisioning.eq_ignore_ascii_case("failed") {
            json!({
                "code": "ProvisioningState/failed/InternalOperationError",
                "level": "Error",
                "displayStatus": "Provisioning failed",
                "message": "Operation abandoned due to internal error. Please try again later.",
                "time": "2026-11-27T08:00:00+00:00",
            })
        } else {
            json!({
                "code": format!("ProvisioningState/{}", inst.provisioning.to_lowercase()),
                "level": "Info",
                "displayStatus": format!("Provisioning {}", inst.provisioning.to_lowercase()),
            })
        }];
        if !inst.power.is_empty() {
            statuses.push(json!({
                "code": format!("PowerState/{}", inst.power),
                "level": "Info",
                "displayStatus": format!("VM {}", inst.power),
            }));
        }
        properties["instanceView"] = json!({"platformUpdateDomain": 0, "statuses": statuses});
    }
    if !s.flexible {
        // As in the VirtualMachineScaleSetVM_Get examples of azure-rest-api-specs: the instance
        // model names its subnet, so writing it back needs join rights on that subnet.
        properties["networkProfileConfiguration"] = json!({"networkInterfaceConfigurations": [{
            "name": "nic",
            "properties": {"primary": true, "ipConfigurations": [{"name": "ipconfig", "properties": {
                "subnet": {"id": format!("/subscriptions/{SUB}/resourceGroups/rg-net/providers/Microsoft.Network/virtualNetworks/vnet/subnets/pool")}
            }}]}
        }]});
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
        "sku": {"name": "Standard_D4s_v5", "tier": "Standard", "capacity": s.written_capacity.unwrap_or(s.capacity)},
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
    if s.sync_writes {
        apply(s, effect);
        return reply(200, if status == 202 { Value::Null } else { body }, &[]);
    }
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
            // Towards the capacity last written (a later write's operation may still run).
            let target = s.written_capacity.unwrap_or(target);
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

/// What a failed operation leaves behind, as Azure shows it: the instances of a failed start
/// are deallocated again and of a failed deallocate still running, both with `provisioningState`
/// `Failed` (the state of the last operation), not stuck in between; a capacity write that was
/// refused leaves the capacity as it was.
fn failed(s: &mut State, effect: Option<Effect>) {
    match effect {
        Some(Effect::Power(ids, target)) => {
            let back = if target == "running" {
                "deallocated"
            } else {
                "running"
            };
            set_power_now(s, &ids, back, "Failed");
        }
        // Refused (a quota): the scale set keeps the capacity it has.
        Some(Effect::Capacity(_)) => s.written_capacity = None,
        _ => {}
    }
}

pub(super) fn poll(s: &mut State, path: &str) -> Response<Full<Bytes>> {
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
    let mut effect = op.effect.take();
    if s.op_failure_example.is_some() || s.op_failure.is_some() {
        failed(s, effect.take());
    }
    if let Some(name) = s.op_failure_example {
        let (status, mut body) = super::arm_example(name);
        body["name"] = json!(id);
        return reply(status, body, &[]);
    }
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

pub(super) fn route(
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
                s.written_capacity = Some(target);
                accepted(s, 200, answer, Effect::Capacity(target))
            }
            _ => arm_error(405, "MethodNotAllowed", "no"),
        };
    }
    if let Some(rest) = path.strip_prefix(&format!("{vmss}/")) {
        return match (method, rest) {
            ("GET", "virtualMachines") if !s.flexible => {
                if let Some(body) = &s.instances_override {
                    return reply(200, body.clone(), &[]);
                }
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
                        s.next_link_origin.clone().unwrap_or_else(|| s.addr.clone())
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
            ("PUT", other) if other.starts_with("virtualMachines/") && s.flexible => {
                // Flexible members: the instance id is the VM name, and instance protection
                // needs api-version 2023-09-01 or later (older versions refuse a non-numeric
                // instance id, as Azure/azure-sdk-for-go issue 19707 shows).
                let name = other.trim_start_matches("virtualMachines/");
                let new_enough = query
                    .get("api-version")
                    .is_some_and(|v| v.as_str() >= "2023-09-01");
                let Some(id) = flex_id(name).filter(|id| s.instances.contains_key(id)) else {
                    return arm_error(404, "NotFound", "The entity was not found.");
                };
                if !new_enough {
                    return arm_error(
                        400,
                        "InvalidParameter",
                        "Virtual Machine Scale Set VM instanceId must be a number.",
                    );
                }
                let protect = body
                    .and_then(|b| b.pointer("/properties/protectionPolicy/protectFromScaleIn"))
                    .and_then(Value::as_bool);
                if let (Some(p), Some(i)) = (protect, s.instances.get_mut(&id)) {
                    i.protect = p;
                }
                let inst = s.instances.get(&id).cloned().unwrap_or_else(|| running(id));
                let answer = instance_json(s, id, &inst, false);
                accepted(s, 200, answer, Effect::Nothing)
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
                        let names_subnet = body.is_some_and(|b| {
                            b.pointer("/properties/networkProfileConfiguration")
                                .is_some()
                                || b.pointer("/properties/networkProfile").is_some()
                        });
                        if names_subnet && s.deny_subnet_join {
                            return arm_error(
                                403,
                                "LinkedAuthorizationFailed",
                                "The client 'poolgate' with object id '22222222-2222-2222-2222-222222222222' has permission to perform action 'Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write' on scope '/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-pool/providers/Microsoft.Compute/virtualMachineScaleSets/dsvm/virtualMachines/1'; however, it does not have permission to perform action(s) 'Microsoft.Network/virtualNetworks/subnets/join/action' on the linked scope(s) '/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-net/providers/Microsoft.Network/virtualNetworks/vnet/subnets/pool' (respectively) or the linked scope(s) are invalid.",
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
        // As public clients send it (the property path quoted too).
        let wanted = format!("'virtualMachineScaleSet/id' eq '{vmss}'");
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
