#!/usr/bin/env bash
# verify-evidence.sh — check a spark-slurm evidence bundle with sqlite3, sha256sum and openssl only.
#
# Usage: verify-evidence.sh [--witness-pub PEM] [--issuer-pub PEM] [--node-pub PEM]... BUNDLE
# Exit: 0 valid, 1 invalid ("BUNDLE: PART: reason"), 2 unusable input.
# The format is docs/evidence.md; this script is its executable reading, independent
# of the Python code (`sparkctl verify-evidence`), and checks in the same order so
# both name the same first failure. Pin the keys you hold (--witness-pub at least):
# without pins the bundle's own keys are used and their ids printed to compare.
set -u -o pipefail
export LC_ALL=C

PROG=verify-evidence.sh
BUNDLE= WPIN= IPIN=
NPINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --witness-pub) WPIN=${2:?--witness-pub needs a file}; shift 2 ;;
    --issuer-pub) IPIN=${2:?--issuer-pub needs a file}; shift 2 ;;
    --node-pub) NPINS+=("${2:?--node-pub needs a file}"); shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "$PROG: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$BUNDLE" ] || { echo "$PROG: one bundle at a time" >&2; exit 2; }
       BUNDLE=$1; shift ;;
  esac
done
[ -n "$BUNDLE" ] || { echo "$PROG: usage: $PROG [--witness-pub F] [--issuer-pub F] [--node-pub F]... BUNDLE" >&2; exit 2; }

unusable() { echo "$PROG: $BUNDLE: $*" >&2; exit 2; }
input_error() { echo "$PROG: $*" >&2; exit 2; }
fail() { echo "$BUNDLE: $1: $2"; exit 1; }

[ -f "$BUNDLE" ] || unusable "cannot read bundle: no such file"
[ "$(head -c 15 "$BUNDLE")" = "SQLite format 3" ] || unusable "not an evidence bundle (not an SQLite database)"
TMP=$(mktemp -d) || exit 2
trap 'rm -rf "$TMP"' EXIT
mkdir "$TMP/l" "$TMP/c" "$TMP/p"
URI="file:$(cd "$(dirname "$BUNDLE")" && pwd)/$(basename "$BUNDLE")?mode=ro"
q() { sqlite3 -batch -noheader -separator '|' "$URI" "$@"; }
meta() { q "SELECT value FROM bundle WHERE key='$1'" 2>/dev/null; }
q "SELECT 1 FROM bundle LIMIT 1" >/dev/null 2>&1 || unusable "not an evidence bundle (no bundle table)"
[ "$(meta format)" = "spark-slurm-evidence" ] && [ "$(meta version)" = 1 ] || \
  unusable "not a version 1 spark-slurm-evidence bundle"
for t in record proof checkpoint key policy statement; do
  q "SELECT 1 FROM $t LIMIT 1" >/dev/null 2>&1 || unusable "not an evidence bundle (no $t table)"
done
JOB=$(meta job_id) ISSUER=$(meta issuer) WITNESS=$(meta witness)

hex2bin() { printf "$(printf '%s' "$1" | sed 's/../\\x&/g')"; }
b64hex() { printf '%s' "$1" | base64 -d 2>/dev/null | od -An -v -tx1 | tr -d ' \n'; }
node_hash() { { printf '\001'; hex2bin "$1"; hex2bin "$2"; } | sha256sum | cut -c1-64; }
raw_to_pem() { { hex2bin 302a300506032b6570032100; hex2bin "$1"; } > "$2.der"
  openssl pkey -pubin -inform DER -in "$2.der" -out "$2" 2>/dev/null; }
pem_raw_hex() { openssl pkey -pubin -in "$1" -outform DER 2>/dev/null | tail -c 32 | od -An -v -tx1 | tr -d ' \n'; }
kid() { hex2bin "$1" | sha256sum | cut -c1-16; }

# --- keys, and the pins the caller holds ----------------------------------------------
declare -A KRAW=() KROLE=() KNODE=() KPEM=()
i=0
while IFS='|' read -r name role node pub; do
  [ -n "$name" ] || continue
  raw=$(b64hex "$pub")
  [ ${#raw} -eq 64 ] || fail "key $name" "not a base64 32-byte Ed25519 public key"
  i=$((i + 1)); raw_to_pem "$raw" "$TMP/k$i.pem" || fail "key $name" "not a base64 32-byte Ed25519 public key"
  KRAW[$name]=$raw KROLE[$name]=$role KNODE[$name]=$node KPEM[$name]=$TMP/k$i.pem
done < <(q "SELECT name, role, coalesce(node, ''), public_key FROM key ORDER BY name")
pin_raw() { local r; r=$(pem_raw_hex "$1"); [ ${#r} -eq 64 ] || input_error "$1: not a PEM public key"; printf '%s' "$r"; }
check_pin() { # role name pemfile
  local have want
  [ -n "${KRAW[$2]+x}" ] || fail "key $2" "the bundle holds no $1 key named '$2'"
  have=${KRAW[$2]}; want=$(pin_raw "$3") || exit 2
  [ "$have" = "$want" ] || fail "key $2" "the $1 key $(kid "$have") is not the pinned $1 key $(kid "$want")"
}
PINNED=
if [ -n "$WPIN" ]; then check_pin witness "$WITNESS" "$WPIN"; PINNED="witness"; fi
if [ -n "$IPIN" ]; then check_pin issuer "$ISSUER" "$IPIN"; PINNED="${PINNED:+$PINNED, }issuer"; fi
if [ ${#NPINS[@]} -gt 0 ]; then
  declare -A WANT=()
  for f in "${NPINS[@]}"; do r=$(pin_raw "$f") || exit 2; WANT[$r]=1; done
  while IFS='|' read -r name; do
    [ -n "${WANT[${KRAW[$name]}]+x}" ] || fail "key $name" "node key $(kid "${KRAW[$name]}") is not one of the pinned node keys"
  done < <(q "SELECT name FROM key WHERE role = 'node' ORDER BY name")
  PINNED="${PINNED:+$PINNED, }nodes"
fi

# note_signed FILE NAME PART -> prints ok | missing | bad (signed-note rules)
note_signed() {
  local f=$1 name=$2 part=$3 raw=${KRAW[$2]} kh line n blob found=0
  awk '$0 == "" {exit} {print}' "$f" > "$TMP/body"
  kh=$({ printf '%s\n\001' "$name"; hex2bin "$raw"; } | sha256sum | cut -c1-8)
  awk 'f {print} $0 == "" {f = 1}' "$f" > "$TMP/siglines"
  while IFS= read -r line; do
    case "$line" in "— "*) ;; *) fail "$part" "signature line '${line:0:40}' does not start with '— '" ;; esac
    n=${line#— }; blob=${n#* }; n=${n%% *}
    printf '%s' "$blob" | base64 -d > "$TMP/sig" 2>/dev/null || fail "$part" "a signature is not base64"
    [ "$(wc -c < "$TMP/sig")" -ge 5 ] || fail "$part" "a signature line is too short"
    [ "$n" = "$name" ] || continue
    [ "$(head -c 4 "$TMP/sig" | od -An -v -tx1 | tr -d ' \n')" = "$kh" ] || continue
    found=1
    tail -c +5 "$TMP/sig" > "$TMP/sig64"
    if openssl pkeyutl -verify -pubin -inkey "${KPEM[$name]}" -rawin -in "$TMP/body" \
         -sigfile "$TMP/sig64" >/dev/null 2>&1; then echo ok; return; fi
  done < "$TMP/siglines"
  if [ "$found" = 1 ]; then echo bad; else echo missing; fi
}

# --- the issuer's statement ----------------------------------------------------------
q "SELECT writefile('$TMP/statement', text) FROM statement WHERE id = 1" >/dev/null
[ -s "$TMP/statement" ] || unusable "bundle has no statement"
[ -n "${KRAW[$ISSUER]+x}" ] || fail statement "the bundle holds no issuer key named '$ISSUER'"
case $(note_signed "$TMP/statement" "$ISSUER" statement) in
  ok) ;;
  missing) fail statement "carries no signature by the issuer key $ISSUER ($(kid "${KRAW[$ISSUER]}"))" ;;
  *) fail statement "the issuer signature by $ISSUER does not verify (statement edited)" ;;
esac
grep -q '^$' "$TMP/statement" && [ "$(head -n 1 "$TMP/statement")" = "spark-evidence/v1" ] || \
  fail statement "not a spark-evidence/v1 signed note"
declare -A CPSIZE=() CPROOT=() CPORIGIN=() NAMED=() POLICY=()
CPNODES=() RECS=() POLICIES=()
SJOB= SCREATED= n=1
while IFS= read -r line; do
  n=$((n + 1))
  read -r word a b c d extra <<< "$line"
  if [ "$word" = job ] && [ -n "$a" ] && [ -z "$b" ]; then SJOB=$a
  elif [ "$word" = created ] && [[ "$a" =~ ^-?[0-9]+$ ]] && [ -z "$b" ]; then SCREATED=$a
  elif [ "$word" = checkpoint ] && [ -n "$d" ] && [ -z "$extra" ] && [[ "$c" =~ ^-?[0-9]+$ ]]; then
    CPNODES+=("$a"); CPORIGIN[$a]=$b; CPSIZE[$a]=$c; CPROOT[$a]=$d
  elif [ "$word" = record ] && [ -z "$d" ] && [[ "$b" =~ ^-?[0-9]+$ ]] && [ ${#c} -eq 64 ]; then
    RECS+=("$a $b $c")
  elif [ "$word" = policy ] && [ ${#a} -eq 64 ] && [ -z "$b" ]; then POLICIES+=("$a"); POLICY[$a]=1
  else fail statement "line $n is not understood: '${line:0:80}'"; fi
done < <(awk 'NR > 1 && $0 == "" {exit} NR > 1 {print}' "$TMP/statement")
[ -n "$SJOB" ] && [ -n "$SCREATED" ] || fail statement "names no job or no creation time"
[ "$SJOB" = "$JOB" ] || fail statement "names job $SJOB, the bundle says $JOB"

# --- checkpoints: node signature and witness cosignature -----------------------------
for node in ${CPNODES[@]+"${CPNODES[@]}"}; do
  part="checkpoint $node"
  rm -f "$TMP/cp"
  q "SELECT writefile('$TMP/cp', text) FROM checkpoint WHERE node = '${node//\'/\'\'}'" >/dev/null
  [ -f "$TMP/cp" ] || fail "$part" "named by the statement but missing"
  origin=$(sed -n 1p "$TMP/cp") size=$(sed -n 2p "$TMP/cp") root=$(sed -n 3p "$TMP/cp")
  heads=$(awk '$0 == "" {exit} NR > 3 && /^head / {n++} END {print n + 0}' "$TMP/cp")
  grep -q '^$' "$TMP/cp" || fail "$part" "checkpoint is not a signed note (body, blank line, signatures)"
  printf '%s' "$size" | grep -Eq '^(0|[1-9][0-9]*)$' || fail "$part" "checkpoint tree size '$size' is not a decimal number"
  [ "$(printf '%s' "$root" | base64 -d 2>/dev/null | wc -c)" = 32 ] || fail "$part" "checkpoint root is not 32 bytes of base64"
  [ "$heads" = 1 ] || fail "$part" "checkpoint needs exactly one 'head <hash>' extension line"
  [ "$origin" = "${CPORIGIN[$node]}" ] && [ "$size" = "${CPSIZE[$node]}" ] && [ "$root" = "${CPROOT[$node]}" ] || \
    fail "$part" "origin, size or root differs from the statement (checkpoint text edited)"
  [ -n "${KRAW[$origin]+x}" ] || fail "$part" "the bundle holds no node key named '$origin'"
  [ "${KNODE[$origin]}" = "$node" ] || fail "$part" "key $origin is not node $node's key"
  case $(note_signed "$TMP/cp" "$origin" "$part") in
    ok) ;;
    bad) fail "$part" "node signature does not verify (signature or checkpoint text edited)" ;;
    *) fail "$part" "no node signature by key $origin ($(kid "${KRAW[$origin]}")): wrong or replaced key" ;;
  esac
  [ -n "${KRAW[$WITNESS]+x}" ] || fail "$part" "the bundle holds no witness key named '$WITNESS'"
  case $(note_signed "$TMP/cp" "$WITNESS" "$part") in
    ok) ;;
    bad) fail "$part" "witness cosignature does not verify (cosignature or checkpoint text edited)" ;;
    *) fail "$part" "no witness cosignature by $WITNESS ($(kid "${KRAW[$WITNESS]}"))" ;;
  esac
done
while IFS= read -r node; do
  [ -n "${CPSIZE[$node]+x}" ] || fail "checkpoint $node" "not named by the statement"
done < <(q "SELECT node FROM checkpoint ORDER BY node")

# --- records: bytes as stated, envelope, chain hash, inclusion proof -----------------
B="CAST(body AS TEXT)"
SFX="',\"job\":' || CASE WHEN job_id IS NULL THEN 'null' ELSE json_quote(job_id) END || ',\"kind\":' || json_quote(kind) || ',\"seq\":' || seq || ',\"time_ns\":' || time_ns || '}'"
q "SELECT writefile('$TMP/l/' || rowid, x'00' || body), writefile('$TMP/c/' || rowid, prev_hash || body) FROM record" >/dev/null
declare -A ROW=() COLS=() HASH=() PROOF=()
while IFS='|' read -r rowid node seq cols hash; do
  ROW["$node/$seq"]=$rowid COLS["$node/$seq"]=$cols HASH["$node/$seq"]=$hash
done < <(q "SELECT rowid, node, seq, (substr($B, 1, 8) = '{\"body\":' AND substr($B, -length($SFX)) = $SFX), lower(hex(hash)) FROM record ORDER BY node, seq")
while IFS='|' read -r node seq h; do
  PROOF["$node/$seq"]="${PROOF["$node/$seq"]:-} $h"
done < <(q "SELECT node, seq, lower(hex(hash)) FROM proof ORDER BY node, seq, step")
root_from_proof() { # index size leafhex proofhashes... -> root hex, or nothing when malformed
  local fn=$1 sn=$(($2 - 1)) r=$3 p; shift 3
  [ "$fn" -ge 0 ] && [ "$fn" -le "$sn" ] || return
  for p in "$@"; do
    [ "$sn" -gt 0 ] || return
    if (( (fn & 1) == 1 || fn == sn )); then
      r=$(node_hash "$p" "$r")
      if (( (fn & 1) == 0 )); then while (( fn != 0 && (fn & 1) == 0 )); do fn=$((fn >> 1)); sn=$((sn >> 1)); done; fi
    else
      r=$(node_hash "$r" "$p")
    fi
    fn=$((fn >> 1)); sn=$((sn >> 1))
  done
  [ "$sn" -eq 0 ] && printf '%s' "$r"
}
for rec in ${RECS[@]+"${RECS[@]}"}; do
  read -r node seq leaf <<< "$rec"
  part="record $node/$seq"; NAMED["$node/$seq"]=1
  rowid=${ROW["$node/$seq"]:-}
  [ -n "$rowid" ] || fail "$part" "named by the statement but missing from the bundle (dropped)"
  own=$(sha256sum < "$TMP/l/$rowid" | cut -c1-64)
  [ "$own" = "$leaf" ] || fail "$part" "stored bytes differ from the statement (PER body edited)"
  [ "${COLS["$node/$seq"]}" = 1 ] || fail "$part" "seq/time/kind/job columns do not match the hashed bytes"
  [ "$(sha256sum < "$TMP/c/$rowid" | cut -c1-64)" = "${HASH["$node/$seq"]}" ] || \
    fail "$part" "hash is not SHA-256(prev_hash || body)"
  [ -n "${CPSIZE[$node]+x}" ] || fail "$part" "no checkpoint of its node in the statement"
  [ "$seq" -lt "${CPSIZE[$node]}" ] || fail "$part" "not covered by the checkpoint (size ${CPSIZE[$node]})"
  # shellcheck disable=SC2086  # the proof is a list of hashes
  got=$(root_from_proof "$seq" "${CPSIZE[$node]}" "$own" ${PROOF["$node/$seq"]:-})
  [ -n "$got" ] && [ "$got" = "$(b64hex "${CPROOT[$node]}")" ] || \
    fail "$part" "inclusion proof does not lead to the checkpoint root (proof edited)"
done
while IFS='|' read -r node seq; do
  [ -n "${NAMED["$node/$seq"]+x}" ] || fail "record $node/$seq" "not named by the statement"
done < <(q "SELECT node, seq FROM record ORDER BY node, seq")
while IFS='|' read -r node seq; do
  [ -n "${NAMED["$node/$seq"]+x}" ] || fail "proof $node/$seq" "belongs to no record of the statement"
done < <(q "SELECT DISTINCT node, seq FROM proof ORDER BY node, seq")

# --- the policy snapshot, and the decisions that cite it ------------------------------
declare -A PROVEN=()
q "SELECT writefile('$TMP/p/r' || rowid, json_extract($B, '\$.body.text')) FROM record WHERE kind = 'policy' AND json_type($B, '\$.body.text') = 'text'" >/dev/null
while IFS='|' read -r rowid sha; do
  [ -f "$TMP/p/r$rowid" ] || continue
  [ "$(sha256sum < "$TMP/p/r$rowid" | cut -c1-64)" = "$sha" ] && PROVEN[$sha]=1
done < <(q "SELECT rowid, json_extract($B, '\$.body.sha256') FROM record WHERE kind = 'policy'")
for sha in ${POLICIES[@]+"${POLICIES[@]}"}; do
  part="policy ${sha:0:16}"
  rm -f "$TMP/p/t"
  q "SELECT writefile('$TMP/p/t', CAST(text AS BLOB)) FROM policy WHERE sha256 = '$sha'" >/dev/null
  [ -f "$TMP/p/t" ] || fail "$part" "named by the statement but missing"
  [ "$(sha256sum < "$TMP/p/t" | cut -c1-64)" = "$sha" ] || fail "$part" "text does not hash to its sha256 (policy snapshot edited)"
  [ -n "${PROVEN[$sha]+x}" ] || fail "$part" "matches no policy record in the bundle"
done
while IFS= read -r sha; do
  [ -n "${POLICY[$sha]+x}" ] || fail "policy ${sha:0:16}" "not named by the statement"
done < <(q "SELECT sha256 FROM policy ORDER BY sha256")
while IFS='|' read -r node seq cited; do
  [ -n "${POLICY[$cited]+x}" ] || fail "record $node/$seq" "its decision cites policy ${cited:0:16}, which the bundle does not hold"
done < <(q "SELECT node, seq, json_extract($B, '\$.body.decision.policy_sha256') FROM record
            WHERE json_type($B, '\$.body.decision.policy_sha256') = 'text'
              AND json_extract($B, '\$.body.decision.policy_sha256') != '' ORDER BY node, seq")

KEYS=$(for name in "${!KRAW[@]}"; do printf '%s: %s %s\n' "$name" "${KROLE[$name]}" "$(kid "${KRAW[$name]}")"; done | sort | paste -sd ';' | sed 's/;/; /g')
NODES=$(printf '%s\n' ${CPNODES[@]+"${CPNODES[@]}"} | sort | paste -sd ',' | sed 's/,/, /g')
echo "$BUNDLE: ok, job $JOB, ${#RECS[@]} records from $NODES; keys $KEYS; pinned ${PINNED:-none (compare the key ids with your own copies)}"
exit 0
