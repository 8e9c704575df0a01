//! Table administration: `riskd store init` (create the table, enable
//! TTL), `riskd store check` (what is wrong with it) and `riskd store
//! prune` (delete the commit markers no item needs).

use super::capacity;
use super::client::{never, send, Remote};
use super::codec::{attr, integer, item_key, key_item, marker_key, FlushId, MARKER_PREFIX};
use super::{backend, DynamoConfig, Layout};
use crate::state::{Result, StateError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnConsumedCapacity,
    ScalarAttributeType, TableDescription, TableStatus, TimeToLiveSpecification, TimeToLiveStatus,
};
use std::collections::HashSet;
use std::time::Duration;

/// The item that says which layout the table holds.
const LAYOUT_KEY: &str = "riskd/layout";

/// The layout the table's mark names: `None` when unmarked.
fn marked_layout(remote: &Remote) -> Result<Option<String>> {
    let items = remote.fetch(&[LAYOUT_KEY])?;
    Ok(items.get(LAYOUT_KEY).and_then(|it| match it.get(attr::LAYOUT) {
        Some(AttributeValue::S(name)) => Some(name.clone()),
        _ => None,
    }))
}

/// Whether the table holds any item (one Scan of one item).
fn holds_anything(remote: &Remote) -> Result<bool> {
    let out = remote
        .rt
        .block_on(send(
            &remote.limits,
            "Scan",
            || {
                remote
                    .client
                    .scan()
                    .table_name(&remote.table)
                    .limit(1)
                    .return_consumed_capacity(ReturnConsumedCapacity::Total)
                    .send()
            },
            never,
        ))
        .map_err(|f| f.into_error("Scan", &remote.table, None))?;
    let items = out.items.unwrap_or_default();
    capacity::count("Scan", capacity::reported(out.consumed_capacity.as_ref()), || capacity::scan_units(&items));
    Ok(!items.is_empty())
}

/// Makes sure the table holds `layout`, marking a table that has no mark
/// yet: an empty one with `layout`, one that already holds items (written
/// by riskd before tables were marked, or by Panther) as the per-key
/// layout. A table marked otherwise, or one holding per-key items for the
/// entity layout, is a misfit: its state would read as absent.
pub(super) fn claim_layout(remote: &Remote, layout: Layout) -> Result<()> {
    let marked = match marked_layout(remote)? {
        Some(name) => name,
        None => {
            let name = if holds_anything(remote)? { Layout::Key.name() } else { layout.name() };
            let mut item = key_item(LAYOUT_KEY);
            item.insert(attr::META.into(), AttributeValue::S("layout".into()));
            item.insert(attr::LAYOUT.into(), AttributeValue::S(name.into()));
            let put = remote.rt.block_on(send(
                &remote.limits,
                "PutItem",
                || {
                    remote
                        .client
                        .put_item()
                        .table_name(&remote.table)
                        .set_item(Some(item.clone()))
                        .condition_expression("attribute_not_exists(#k)")
                        .expression_attribute_names("#k", attr::KEY)
                        .return_consumed_capacity(ReturnConsumedCapacity::Total)
                        .send()
                },
                never,
            ));
            match put {
                Ok(out) => {
                    capacity::count("PutItem", capacity::reported(out.consumed_capacity()), || 1.0);
                    name.to_string()
                }
                // Marked by another process meanwhile: its mark holds.
                Err(f) if f.code == "ConditionalCheckFailedException" => {
                    marked_layout(remote)?.unwrap_or_else(|| name.to_string())
                }
                Err(f) => return Err(f.into_error("PutItem", &remote.table, Some(LAYOUT_KEY))),
            }
        }
    };
    if marked != layout.name() {
        return Err(StateError::TableMisfit {
            table: remote.table.clone(),
            problems: vec![format!(
                "it holds the {marked:?} layout (item {LAYOUT_KEY:?}) and store.layout is {:?}: the state would read as absent; set store.layout = {marked:?}, or use another table",
                layout.name()
            )],
        });
    }
    Ok(())
}

/// `riskd store prune`: deletes the commit markers no item needs any more.
///
/// A marker `riskd/flush/<run>` says which flushes of a run committed; an
/// item that names the run in `riskdFlush` is read through it. Once every
/// such item has been overwritten by other runs, the marker is dead weight
/// (one per store opened that wrote). One Scan finds the runs still named
/// by some item and each marker's last commit; a marker whose run no item
/// names and whose last commit is older than `idle` is deleted, on the
/// condition that its commit count has not moved since the Scan. A run
/// that writes again meanwhile either commits before the Scan reads its
/// marker (then the commit is recent: kept) or after (then the count moved:
/// the delete fails), so no item ever loses the marker it is read through.
/// Returns what was done, one line per fact.
pub fn prune_markers(cfg: &DynamoConfig, idle: Duration) -> Result<Vec<String>> {
    let remote = Remote::connect(cfg)?;
    let now = crate::event::now_ms();
    let idle_ms = i64::try_from(idle.as_millis()).unwrap_or(i64::MAX);
    let projection = format!("#k, {}, {}, {}", attr::FLUSH, attr::COMMITTED_SEQ, attr::COMMITTED_AT);
    let items =
        remote.scan_all(|req| req.projection_expression(&projection).expression_attribute_names("#k", attr::KEY))?;
    let mut named = HashSet::new();
    let mut markers = Vec::new();
    for item in &items {
        let Some(key) = item_key(item) else { continue };
        if let Some(AttributeValue::S(text)) = item.get(attr::FLUSH) {
            named.insert(FlushId::parse(key, text)?.run);
        }
        if let Some(run) = key.strip_prefix(MARKER_PREFIX) {
            let Some(seq) = item.get(attr::COMMITTED_SEQ) else { continue };
            let at = match item.get(attr::COMMITTED_AT) {
                Some(v) => integer(key, attr::COMMITTED_AT, v)?,
                None => 0,
            };
            markers.push((run.to_string(), seq.clone(), at));
        }
    }
    let (mut deleted, mut recent, mut moved) = (0, 0, 0);
    let in_use = markers.iter().filter(|(run, _, _)| named.contains(run)).count();
    for (run, seq, at) in markers.iter().filter(|(run, _, _)| !named.contains(run)) {
        if now.saturating_sub(*at) < idle_ms {
            recent += 1;
            continue;
        }
        let key = marker_key(run);
        let gone = remote
            .rt
            .block_on(send(
                &remote.limits,
                "DeleteItem",
                || {
                    remote
                        .client
                        .delete_item()
                        .table_name(&remote.table)
                        .set_key(Some(key_item(&key)))
                        .condition_expression(format!("{} = :seq", attr::COMMITTED_SEQ))
                        .expression_attribute_values(":seq", seq.clone())
                        .return_consumed_capacity(ReturnConsumedCapacity::Total)
                        .send()
                },
                never,
            ))
            .map(|out| capacity::count("DeleteItem", capacity::reported(out.consumed_capacity()), || 1.0));
        match gone {
            Ok(_) => deleted += 1,
            Err(f) if f.code == "ConditionalCheckFailedException" => {
                // A failed condition is billed too.
                capacity::count("DeleteItem", None, || 1.0);
                moved += 1
            }
            Err(f) => return Err(f.into_error("DeleteItem", &remote.table, Some(&key))),
        }
    }
    Ok(vec![
        format!("{} commit markers in table {:?}; {in_use} still named by items", markers.len(), remote.table),
        format!("deleted {deleted}; kept {recent} that committed less than {} ago", humantime::format_duration(idle)),
        format!("kept {moved} whose run committed again during the prune"),
    ])
}

// --- setting up and checking the table -------------------------------------

/// The table's description; `None` when it does not exist.
async fn describe(remote: &Remote) -> Result<Option<TableDescription>> {
    match send(
        &remote.limits,
        "DescribeTable",
        || remote.client.describe_table().table_name(&remote.table).send(),
        never,
    )
    .await
    {
        Ok(out) => Ok(out.table),
        Err(f) if f.code == "ResourceNotFoundException" => Ok(None),
        Err(f) => Err(f.into_error("DescribeTable", &remote.table, None)),
    }
}

/// What is wrong with a table's key schema and status for riskd.
fn table_problems(table: &TableDescription) -> Vec<String> {
    let mut problems = Vec::new();
    let schema: Vec<String> =
        table.key_schema().iter().map(|k| format!("{} {}", k.attribute_name(), k.key_type().as_str())).collect();
    if schema != [format!("{} HASH", attr::KEY)] {
        problems.push(format!(
            "key schema is [{}], expected [{} HASH] (a hash key only)",
            schema.join(", "),
            attr::KEY
        ));
    }
    let key_type = table
        .attribute_definitions()
        .iter()
        .find(|d| d.attribute_name() == attr::KEY)
        .map(|d| d.attribute_type().as_str().to_string());
    if let Some(t) = key_type.filter(|t| t != "S") {
        problems.push(format!("attribute {} is of type {t}, expected S (string)", attr::KEY));
    }
    match table.table_status() {
        Some(TableStatus::Active | TableStatus::Updating) | None => {}
        Some(other) => problems.push(format!("table status is {}, not ACTIVE", other.as_str())),
    }
    problems
}

/// The table's TTL: status and attribute.
async fn ttl_state(remote: &Remote) -> Result<(Option<TimeToLiveStatus>, Option<String>)> {
    let out = send(
        &remote.limits,
        "DescribeTimeToLive",
        || remote.client.describe_time_to_live().table_name(&remote.table).send(),
        never,
    )
    .await
    .map_err(|f| f.into_error("DescribeTimeToLive", &remote.table, None))?;
    let d = out.time_to_live_description;
    Ok((
        d.as_ref().and_then(|d| d.time_to_live_status().cloned()),
        d.as_ref().and_then(|d| d.attribute_name().map(str::to_string)),
    ))
}

/// What is wrong with the table's TTL, when `want` says whether it should be on.
fn ttl_problems(want: bool, status: Option<&TimeToLiveStatus>, attribute: Option<&str>) -> Vec<String> {
    let on = matches!(status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling));
    let status_text = status.map_or("DISABLED", |s| s.as_str());
    match (want, on) {
        (true, true) if attribute == Some(attr::EXPIRES_AT) => vec![],
        (true, true) => vec![format!(
            "TTL is on attribute {}, expected {} (items would never expire)",
            attribute.unwrap_or("?"),
            attr::EXPIRES_AT
        )],
        (true, false) => vec![format!(
            "TTL is {status_text}, expected ENABLED on {} (`riskd store init` enables it)",
            attr::EXPIRES_AT
        )],
        (false, true) => vec![format!(
            "TTL is {status_text} on {} but store.ttl = false: DynamoDB would delete state whose event-time expiry is past in wall-clock time",
            attribute.unwrap_or("?")
        )],
        (false, false) => vec![],
    }
}

/// `riskd store check`: what is wrong with the configured table (empty:
/// nothing). A table that does not exist is one problem.
pub fn check_table(cfg: &DynamoConfig) -> Result<Vec<String>> {
    let remote = Remote::connect(cfg)?;
    let mut problems = remote.rt.block_on(async {
        let Some(table) = describe(&remote).await? else {
            return Ok(vec![format!(
                "table {:?} does not exist in {} (create it with `riskd store init`)",
                remote.table, remote.place
            )]);
        };
        let mut problems = table_problems(&table);
        let (status, attribute) = ttl_state(&remote).await?;
        problems.extend(ttl_problems(cfg.ttl, status.as_ref(), attribute.as_deref()));
        Ok(problems)
    })?;
    if problems.is_empty() {
        match marked_layout(&remote)? {
            Some(name) if name != cfg.layout.name() => problems.push(format!(
                "the table holds the {name:?} layout and store.layout is {:?} (set store.layout = {name:?}, or use another table)",
                cfg.layout.name()
            )),
            // Unmarked: the first run marks it.
            _ => {}
        }
    }
    Ok(problems)
}

/// `riskd store init`: creates the table (on-demand, hash key `key` S) if it
/// does not exist and enables TTL on `expiresAt` (unless `ttl` is off).
/// Running it again on a correct table changes nothing. Returns what it
/// did, one line per step.
pub fn init_table(cfg: &DynamoConfig) -> Result<Vec<String>> {
    let remote = Remote::connect(cfg)?;
    let mut done = remote.rt.block_on(async {
        let mut done = Vec::new();
        let table = match describe(&remote).await? {
            Some(table) => {
                done.push(format!("table {:?} exists in {}", remote.table, remote.place));
                Some(table)
            }
            None => create_table(&remote, &mut done).await?,
        };
        if let Some(t) = &table {
            let problems = table_problems(t);
            if !problems.is_empty() {
                return Err(misfit(&remote, problems));
            }
        }
        done.push(set_up_ttl(&remote, cfg.ttl).await?);
        Ok(done)
    })?;
    claim_layout(&remote, cfg.layout)?;
    done.push(format!("the table holds the {:?} layout (item {LAYOUT_KEY:?})", cfg.layout.name()));
    Ok(done)
}

/// The error for a table riskd cannot use.
fn misfit(remote: &Remote, problems: Vec<String>) -> StateError {
    StateError::TableMisfit { table: remote.table.clone(), problems }
}

/// Creates the table (saying so in `done`) and waits until it is ACTIVE;
/// returns its description then.
async fn create_table(remote: &Remote, done: &mut Vec<String>) -> Result<Option<TableDescription>> {
    let key = KeySchemaElement::builder()
        .attribute_name(attr::KEY)
        .key_type(KeyType::Hash)
        .build()
        .map_err(|e| backend(e.to_string()))?;
    let definition = AttributeDefinition::builder()
        .attribute_name(attr::KEY)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| backend(e.to_string()))?;
    let created = send(
        &remote.limits,
        "CreateTable",
        || {
            remote
                .client
                .create_table()
                .table_name(&remote.table)
                .key_schema(key.clone())
                .attribute_definitions(definition.clone())
                .billing_mode(BillingMode::PayPerRequest)
                .send()
        },
        never,
    )
    .await;
    match created {
        Ok(_) => done.push(format!("created table {:?} in {} (on-demand, hash key key S)", remote.table, remote.place)),
        // Someone created it meanwhile: check it as an existing table.
        Err(f) if f.code == "ResourceInUseException" => {}
        Err(f) => return Err(f.into_error("CreateTable", &remote.table, None)),
    }
    // A new table takes seconds to become ACTIVE on AWS.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let table = describe(remote).await?;
        let status = table.as_ref().and_then(|t| t.table_status().cloned());
        if status == Some(TableStatus::Active) {
            return Ok(table);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(backend(format!("table {:?} is not ACTIVE after 5 minutes", remote.table)));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Enables TTL on `expiresAt` when `want` and it is off; otherwise checks
/// it is as wanted. Returns what it did.
async fn set_up_ttl(remote: &Remote, want: bool) -> Result<String> {
    let (status, attribute) = ttl_state(remote).await?;
    let on = matches!(status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling));
    if !want || on {
        let problems = ttl_problems(want, status.as_ref(), attribute.as_deref());
        if !problems.is_empty() {
            return Err(misfit(remote, problems));
        }
        return Ok(if want {
            format!("TTL already on {}", attr::EXPIRES_AT)
        } else {
            "TTL left off (store.ttl = false)".to_string()
        });
    }
    if status == Some(TimeToLiveStatus::Disabling) {
        return Err(misfit(
            remote,
            vec!["TTL is DISABLING; DynamoDB allows enabling it again only once that ends (up to an hour)".into()],
        ));
    }
    let spec = TimeToLiveSpecification::builder()
        .attribute_name(attr::EXPIRES_AT)
        .enabled(true)
        .build()
        .map_err(|e| backend(e.to_string()))?;
    send(
        &remote.limits,
        "UpdateTimeToLive",
        || {
            remote
                .client
                .update_time_to_live()
                .table_name(&remote.table)
                .time_to_live_specification(spec.clone())
                .send()
        },
        never,
    )
    .await
    .map_err(|f| f.into_error("UpdateTimeToLive", &remote.table, None))?;
    Ok(format!("enabled TTL on {}", attr::EXPIRES_AT))
}
