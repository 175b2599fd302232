#!/usr/bin/env bash
# verify-ledger.sh — verify a spark-slurm ledger with sqlite3, sha256sum and openssl only.
#
# Usage: verify-ledger.sh [--key HMAC_KEY_FILE] [--pubkey NODE_PUB_PEM]
#                         [--checkpoint FILE]... LEDGER.db
# Exit: 0 valid, 1 invalid ("LEDGER: first bad seq N: reason"), 2 unusable input.
# The byte-exact format is docs/ledger-format.md; this script is its executable
# reading, independent of the Python code. It is thorough, not fast: one shell
# loop per record, meant for audits of a node ledger, not for millions of rows.
set -u -o pipefail
export LC_ALL=C

PROG=verify-ledger.sh
KEYFILE= PUBFILE= LEDGER=
CHECKPOINTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --key) KEYFILE=${2:?--key needs a file}; shift 2 ;;
    --pubkey) PUBFILE=${2:?--pubkey needs a file}; shift 2 ;;
    --checkpoint) CHECKPOINTS+=("${2:?--checkpoint needs a file}"); shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "$PROG: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$LEDGER" ] || { echo "$PROG: one ledger at a time" >&2; exit 2; }
       LEDGER=$1; shift ;;
  esac
done
[ -n "$LEDGER" ] || { echo "$PROG: usage: $PROG [--key F] [--pubkey F] [--checkpoint F]... LEDGER" >&2; exit 2; }

unusable() { echo "$PROG: $LEDGER: $*" >&2; exit 2; }
input_error() { echo "$PROG: $*" >&2; exit 2; }
BAD_SEQ= BAD_REASON=
bad() { # first failure wins; seq may be "-" when no record is to blame
  if [ -z "$BAD_REASON" ]; then BAD_SEQ=$1; BAD_REASON=$2; fi
}
finish_if_bad() {
  [ -z "$BAD_REASON" ] && return 0
  if [ "$BAD_SEQ" = "-" ]; then echo "$LEDGER: $BAD_REASON"; else
    echo "$LEDGER: first bad seq $BAD_SEQ: $BAD_REASON"; fi
  exit 1
}

[ -e "$LEDGER" ] || unusable "no such ledger file"
[ -d "$LEDGER" ] && unusable "is a directory, not a ledger"
[ -s "$LEDGER" ] || unusable "empty file, not a ledger"
[ "$(head -c 15 "$LEDGER")" = "SQLite format 3" ] || unusable "not a ledger (not an SQLite database)"

TMP=$(mktemp -d) || exit 2
trap 'rm -rf "$TMP"' EXIT
mkdir "$TMP/r" "$TMP/l" "$TMP/h"
URI="file:$(cd "$(dirname "$LEDGER")" && pwd)/$(basename "$LEDGER")?mode=ro"
q() { sqlite3 -batch -noheader -separator '|' "$URI" "$@"; }

meta() { q "SELECT value FROM meta WHERE key='$1'" 2>/dev/null; }
q "SELECT 1 FROM meta LIMIT 1" >/dev/null 2>&1 || unusable "not a ledger (no readable meta table)"
[ "$(meta format)" = "spark-slurm-ledger" ] || unusable "not a ledger (format is '$(meta format)')"
SV=$(meta schema_version)
case "$SV" in 1|2) ;; *) unusable "unknown ledger schema version '$SV' (this tool reads 1 and 2)" ;; esac
CUT=$(q "SELECT json_extract(value, '$.seq') FROM meta WHERE key='cut'" 2>/dev/null)
[ -z "$CUT" ] || unusable "pruned before seq $CUT (sparkctl ledger prune): this script checks whole ledgers; check the kept part with sparkctl verify, the archives by merging them"
NODE=$(meta node) CLUSTER=$(meta cluster) HMAC_ID=$(meta hmac_key_id)
ORIGIN="spark/$CLUSTER/$NODE"

hex2bin() { printf "$(printf '%s' "$1" | sed 's/../\\x&/g')"; }
lower() { tr 'A-F' 'a-f'; }
hmac_hex() { # key-hex file -> hex
  openssl dgst -sha256 -mac HMAC -macopt "hexkey:$1" "$2" | sed 's/.*= //'; }
node_hash() { { printf '\001'; hex2bin "$1"; hex2bin "$2"; } | sha256sum | cut -c1-64; }
raw_to_pem() { # 32-byte raw Ed25519 key (hex) -> PEM file
  { hex2bin 302a300506032b6570032100; hex2bin "$1"; } > "$2.der"
  openssl pkey -pubin -inform DER -in "$2.der" -out "$2" 2>/dev/null; }
pem_raw_hex() { openssl pkey -pubin -in "$1" -outform DER 2>/dev/null | tail -c 32 | od -An -v -tx1 | tr -d ' \n'; }
key_id_of_raw() { hex2bin "$1" | sha256sum | cut -c1-16; }

# --- keys given by the caller ------------------------------------------------
K0=
if [ -n "$KEYFILE" ]; then
  [ -r "$KEYFILE" ] || input_error "$KEYFILE: cannot read key file"
  [ -z "$(find "$KEYFILE" -perm /077)" ] || input_error "$KEYFILE: key file is accessible by group or others; chmod 600 it"
  K0=$(tr -d ' \n' < "$KEYFILE" | lower)
  printf '%s' "$K0" | grep -Eq '^[0-9a-f]{64}$' || input_error "$KEYFILE: not an HMAC key (expected 64 hex characters)"
  [ -n "$HMAC_ID" ] || unusable "ledger was written without HMAC; no key applies"
  printf 'spark-ledger key id' > "$TMP/idlabel"
  GIVEN_ID=$(hmac_hex "$K0" "$TMP/idlabel" | cut -c1-16)
  [ "$GIVEN_ID" = "$HMAC_ID" ] || unusable "HMAC key $GIVEN_ID is not this ledger's key $HMAC_ID (wrong key file?)"
fi
PUB_ID=
if [ -n "$PUBFILE" ]; then
  PUB_RAW=$(pem_raw_hex "$PUBFILE")
  [ ${#PUB_RAW} -eq 64 ] || input_error "$PUBFILE: not a PEM public key"
  PUB_ID=$(key_id_of_raw "$PUB_RAW")
fi

# --- checkpoints: kept ones (files) and stored ones (in the ledger) --------------
NCP=0 CP_PARSE_ERR=
declare -a CP_LABEL CP_FILE
parse_cp() { # file label kept(1/0) -> fills CP_* arrays, or reports
  local f=$1 label=$2 kept=$3 err=
  local origin size root head nsig
  origin=$(sed -n 1p "$f"); size=$(sed -n 2p "$f"); root=$(sed -n 3p "$f")
  head=$(awk 'NF==0{exit} /^head /{print substr($0,6)}' "$f")
  nsig=$(awk 'f&&/^— /{n++} NF==0{f=1} END{print n+0}' "$f")
  if ! grep -q '^$' "$f"; then err="checkpoint is not a signed note (body, blank line, signatures)"
  elif ! printf '%s' "$size" | grep -Eq '^(0|[1-9][0-9]*)$'; then err="checkpoint tree size '$size' is not a decimal number"
  elif [ "$(printf '%s' "$root" | base64 -d 2>/dev/null | wc -c)" != 32 ]; then err="checkpoint root is not 32 bytes of base64"
  elif ! printf '%s' "$head" | grep -Eq '^[0-9a-f]{64}$'; then err="checkpoint needs exactly one 'head <hash>' extension line"
  elif [ "$nsig" -lt 1 ]; then err="checkpoint carries no signature"; fi
  if [ -n "$err" ]; then
    if [ "$kept" = 1 ]; then input_error "$label: $err"; fi
    [ -n "$CP_PARSE_ERR" ] || CP_PARSE_ERR="$label: $err"; return
  fi
  CP_LABEL[NCP]=$label; CP_FILE[NCP]=$f; NCP=$((NCP + 1))
}
NSTORED=0
for id in $(q "SELECT id FROM checkpoint ORDER BY id"); do
  q "SELECT writefile('$TMP/cp$id', text) FROM checkpoint WHERE id=$id" >/dev/null
  parse_cp "$TMP/cp$id" "stored checkpoint #$id" 0
  NSTORED=$NCP
done
i=0
for f in ${CHECKPOINTS[@]+"${CHECKPOINTS[@]}"}; do
  i=$((i + 1))
  [ -r "$f" ] || input_error "$f: cannot read checkpoint"
  parse_cp "$f" "kept checkpoint $i (size $(sed -n 2p "$f"))" 1
done
declare -A NEED=()
for ((c = 0; c < NCP; c++)); do NEED[$(sed -n 2p "${CP_FILE[c]}")]=1; done

# --- the records ------------------------------------------------------------------
SFX="',\"job\":' || CASE WHEN job_id IS NULL THEN 'null' ELSE json_quote(job_id) END || ',\"kind\":' || json_quote(kind) || ',\"seq\":' || seq || ',\"time_ns\":' || time_ns || '}'"
B="CAST(body AS TEXT)"
q "SELECT writefile('$TMP/r/' || seq, prev_hash || body), writefile('$TMP/l/' || seq, x'00' || body),
          writefile('$TMP/h/' || seq, hash) FROM per" >/dev/null 2>&1  # a damaged page: see below
q "SELECT seq, hex(prev_hash), hex(hash),
     (substr($B, 1, 8) = '{\"body\":' AND substr($B, -length($SFX)) = $SFX),
     CASE kind WHEN 'genesis' THEN 'g' WHEN 'key' THEN 'k' ELSE 'o' END,
     CASE WHEN kind IN ('genesis', 'key') AND NOT json_valid($B) THEN 'invalid'
          WHEN kind = 'key' THEN coalesce(json_extract($B, '\$.body.event'), '-') ELSE '-' END,
     CASE WHEN kind = 'key' AND json_valid($B) AND json_type($B, '\$.body.epoch') = 'integer'
          THEN json_extract($B, '\$.body.epoch') ELSE -1 END,
     CASE WHEN kind = 'key' AND json_valid($B) THEN coalesce(json_extract($B, '\$.body.key_id') = '$HMAC_ID', 0) ELSE 0 END,
     CASE WHEN mac IS NULL THEN '-' ELSE hex(mac) END,
     CASE WHEN key_id IS NULL THEN 'none'
          WHEN key_id = '$HMAC_ID' || ':' || CAST(CAST(substr(key_id, instr(key_id, ':') + 1) AS INTEGER) AS TEXT)
               AND '$HMAC_ID' != '' THEN substr(key_id, instr(key_id, ':') + 1)
          ELSE 'bad' END
   FROM per ORDER BY seq" > "$TMP/rows" 2>/dev/null
ROWS_RC=$?   # nonzero: SQLite stopped at a damaged record; the rows before it still count
N=$(wc -l < "$TMP/rows")
( cd "$TMP/r" && seq 0 $((N - 1)) | xargs -r sha256sum ) > "$TMP/hashes" 2>/dev/null
( cd "$TMP/l" && seq 0 $((N - 1)) | xargs -r sha256sum ) > "$TMP/leaves" 2>/dev/null

# genesis facts, checked against the meta table
G=$(q "SELECT json_extract($B,'\$.body.format') = 'spark-slurm-ledger' AND json_extract($B,'\$.body.schema_version') IN (1, 2)
            AND json_extract($B,'\$.body.schema_version') <= $SV,
          json_extract($B,'\$.body.node') IS (SELECT value FROM meta WHERE key='node')
            AND json_extract($B,'\$.body.cluster') IS (SELECT value FROM meta WHERE key='cluster'),
          CAST(json_extract($B,'\$.body.created_ns') AS TEXT) IS (SELECT value FROM meta WHERE key='created_ns')
            AND CAST(json_extract($B,'\$.body.epoch_seconds') AS TEXT) IS (SELECT value FROM meta WHERE key='epoch_seconds'),
          coalesce(json_extract($B,'\$.body.hmac_key_id'), '') IS (SELECT value FROM meta WHERE key='hmac_key_id'),
          coalesce(json_extract($B,'\$.body.signing_public_key'), '-'),
          coalesce(json_extract($B,'\$.body.signing_key_id'), '-')
        FROM per WHERE seq = 0 AND kind = 'genesis' AND json_valid($B)" 2>/dev/null)

declare -a SIGN_FROM SIGN_PEM SIGN_ID
NSIGN=0
genesis_checks() {
  IFS='|' read -r fmt names times hid gpub gid <<< "$G"
  [ "$fmt" = 1 ] || { bad 0 "genesis record does not name this ledger format and schema version"; return; }
  [ "$names" = 1 ] || { bad 0 "genesis node or cluster differs from the file's meta table"; return; }
  [ "$times" = 1 ] || { bad 0 "genesis created_ns/epoch_seconds differ from the file's meta table"; return; }
  [ "$hid" = 1 ] || { bad 0 "genesis hmac_key_id differs from the file's meta table"; return; }
  if [ "$gpub" != "-" ]; then
    local raw; raw=$(printf '%s' "$gpub" | base64 -d 2>/dev/null | od -An -v -tx1 | tr -d ' \n')
    [ ${#raw} -eq 64 ] || { bad 0 "genesis signing public key is malformed"; return; }
    [ "$(key_id_of_raw "$raw")" = "$gid" ] || { bad 0 "genesis signing_key_id does not match its public key"; return; }
    raw_to_pem "$raw" "$TMP/key0.pem" || { bad 0 "genesis signing public key is malformed"; return; }
    SIGN_FROM[0]=1; SIGN_PEM[0]=$TMP/key0.pem; SIGN_ID[0]=$gid; NSIGN=1
  fi
}
rotation() { # seq
  local s=$1 row pubb64 endb64 kid raw
  [ "$NSIGN" -gt 0 ] || { bad "$s" "key rotation in a ledger that has no signing key"; return; }
  row=$(q "SELECT coalesce(json_extract($B,'\$.body.public_key'),''), coalesce(json_extract($B,'\$.body.endorsement'),''),
                  coalesce(json_extract($B,'\$.body.key_id'),'') FROM per WHERE seq = $s")
  IFS='|' read -r pubb64 endb64 kid <<< "$row"
  raw=$(printf '%s' "$pubb64" | base64 -d 2>/dev/null | od -An -v -tx1 | tr -d ' \n')
  printf '%s' "$endb64" | base64 -d > "$TMP/end.sig" 2>/dev/null
  { printf 'spark-ledger rotate\n%s\n' "$ORIGIN"; hex2bin "$raw"; } > "$TMP/end.msg"
  if [ ${#raw} -ne 64 ] || ! raw_to_pem "$raw" "$TMP/key$NSIGN.pem" || \
     ! openssl pkeyutl -verify -pubin -inkey "${SIGN_PEM[NSIGN-1]}" -rawin -in "$TMP/end.msg" \
        -sigfile "$TMP/end.sig" >/dev/null 2>&1; then
    bad "$s" "key rotation is not endorsed by the outgoing signing key"; return
  fi
  [ "$kid" = "$(key_id_of_raw "$raw")" ] || { bad "$s" "key rotation names a key id that is not its public key's"; return; }
  SIGN_FROM[NSIGN]=$((s + 1)); SIGN_PEM[NSIGN]=$TMP/key$NSIGN.pem; SIGN_ID[NSIGN]=$kid; NSIGN=$((NSIGN + 1))
}

EPOCH=0 SEALED=0 KEY=$K0 KEY_EPOCH=0
epoch_key() { # advance KEY to epoch $1
  printf 'spark-ledger epoch' > "$TMP/eplabel"
  while [ "$KEY_EPOCH" -lt "$1" ]; do KEY=$(hmac_hex "$KEY" "$TMP/eplabel"); KEY_EPOCH=$((KEY_EPOCH + 1)); done
}
declare -a STACK=()
declare -A ROOT_AT=() HEAD_AT=()
frontier_root() {
  local r=${STACK[${#STACK[@]}-1]} j
  for ((j = ${#STACK[@]} - 2; j >= 0; j--)); do r=$(node_hash "${STACK[j]}" "$r"); done
  printf '%s' "$r"
}

EXPECT=0 HEAD=$(printf '0%.0s' $(seq 64))
exec 3< "$TMP/rows" 4< "$TMP/hashes" 5< "$TMP/leaves"
while IFS='|' read -r seq prev hash cols kind event sealepoch sealkid mac kepoch <&3; do
  read -r calc _ <&4; read -r leaf _ <&5
  prev=$(printf '%s' "$prev" | lower); hash=$(printf '%s' "$hash" | lower)
  [ "$seq" = "$EXPECT" ] || { bad "$EXPECT" "record $EXPECT is missing (next stored is $seq)"; break; }
  [ "$prev" = "$HEAD" ] || { bad "$seq" "prev hash does not match the hash of seq $((seq - 1))"; break; }
  [ "$cols" = 1 ] || { bad "$seq" "seq/time/kind/job columns do not match the hashed bytes"; break; }
  [ "$calc" = "$hash" ] || { bad "$seq" "hash does not match prev hash + stored bytes (body or hash edited)"; break; }
  HEAD=$hash
  if [ "$event" = invalid ]; then bad "$seq" "stored bytes are not a JSON envelope"; break; fi
  if [ "$seq" = 0 ]; then
    [ "$kind" = g ] && [ -n "$G" ] || { bad 0 "seq 0 is not a genesis record"; break; }
    genesis_checks; [ -z "$BAD_REASON" ] || break
  elif [ "$kind" = g ]; then bad "$seq" "a second genesis record"; break; fi
  if [ -z "$HMAC_ID" ]; then
    [ "$mac" = - ] && [ "$kepoch" = none ] || { bad "$seq" "record carries a MAC in a ledger created without HMAC"; break; }
  else
    [ "$mac" != - ] && [ "$kepoch" != none ] && [ "$kepoch" != bad ] || { bad "$seq" "record has no MAC or a malformed key id"; break; }
    if [ "$seq" = 0 ]; then [ "$kepoch" = 0 ] || { bad 0 "genesis record is not in epoch 0"; break; }
    elif [ "$kepoch" = $((EPOCH + 1)) ] && [ "$SEALED" = 1 ]; then EPOCH=$kepoch SEALED=0
    elif [ "$kepoch" != "$EPOCH" ]; then
      if [ "$kepoch" = $((EPOCH + 1)) ]; then bad "$seq" "record in epoch $kepoch follows epoch $EPOCH which was not sealed"
      else bad "$seq" "record in epoch $kepoch follows epoch $EPOCH"; fi; break
    elif [ "$SEALED" = 1 ]; then bad "$seq" "record in epoch $kepoch after that epoch was sealed"; break; fi
    if [ -n "$K0" ]; then
      epoch_key "$kepoch"
      [ "$(hmac_hex "$KEY" "$TMP/h/$seq")" = "$(printf '%s' "$mac" | lower)" ] || { bad "$seq" "MAC does not verify with the epoch $kepoch key"; break; }
    fi
  fi
  if [ "$kind" = k ] && [ "$seq" != 0 ]; then
    if [ "$event" = seal ]; then
      [ -n "$HMAC_ID" ] && [ "$sealkid" = 1 ] && [ "$sealepoch" = "$EPOCH" ] || { bad "$seq" "seal record does not seal the current epoch $EPOCH"; break; }
      SEALED=1
    elif [ "$event" = rotate ]; then rotation "$seq"; [ -z "$BAD_REASON" ] || break; fi
  fi
  # Merkle frontier (compact range): merge equal-size subtrees; note each perfect
  # subtree of 2^8 leaves or more (schema 2 stores them in the tree table)
  h=$leaf n=$seq lvl=0
  while (( n & 1 )); do
    h=$(node_hash "${STACK[${#STACK[@]}-1]}" "$h"); unset 'STACK[${#STACK[@]}-1]'; n=$((n >> 1)); lvl=$((lvl + 1))
    [ "$lvl" -lt 8 ] || echo "$lvl|$((seq >> lvl))|$h" >> "$TMP/subtrees"
  done
  STACK+=("$h")
  EXPECT=$((seq + 1))
  if [ -n "${NEED[$EXPECT]+x}" ]; then ROOT_AT[$EXPECT]=$(frontier_root); HEAD_AT[$EXPECT]=$HEAD; fi
done
if [ -z "$BAD_REASON" ] && [ "$EXPECT" -eq 0 ]; then bad 0 "record 0 is missing"; fi
[ -n "$BAD_REASON" ] || [ "$ROWS_RC" -eq 0 ] || bad "$EXPECT" "SQLite cannot read the record"
finish_if_bad
[ -z "$CP_PARSE_ERR" ] || bad - "$CP_PARSE_ERR"
# --- checkpoints -----------------------------------------------------------------------
check_cp() { # index
  local f=${CP_FILE[$1]} label=${CP_LABEL[$1]} size pem= j name blob kh raw ok=0 found=0
  size=$(sed -n 2p "$f")
  [ "$size" -ge 1 ] || { bad - "$label: covers no records"; return; }
  for ((j = 0; j < NSIGN; j++)); do [ "${SIGN_FROM[j]}" -le "$size" ] && pem=${SIGN_PEM[j]}; done
  [ -n "$pem" ] || { bad - "$label: ledger has no signing key to check it with"; return; }
  [ "$(sed -n 1p "$f")" = "$ORIGIN" ] || { bad - "$label: checkpoint origin '$(sed -n 1p "$f")' is not '$ORIGIN'"; return; }
  awk 'NF==0{exit} {print}' "$f" > "$TMP/cpbody"
  raw=$(pem_raw_hex "$pem")
  while read -r line; do
    name=${line#— }; blob=${name#* }; name=${name%% *}
    printf '%s' "$blob" | base64 -d > "$TMP/cpsig" 2>/dev/null || continue
    kh=$({ printf '%s\n\001' "$name"; hex2bin "$raw"; } | sha256sum | cut -c1-8)
    [ "$(head -c 4 "$TMP/cpsig" | od -An -v -tx1 | tr -d ' \n')" = "$kh" ] || continue
    found=1
    tail -c +5 "$TMP/cpsig" > "$TMP/cpsig64"
    if openssl pkeyutl -verify -pubin -inkey "$pem" -rawin -in "$TMP/cpbody" -sigfile "$TMP/cpsig64" >/dev/null 2>&1; then ok=1; break; fi
  done < <(awk 'f&&/^— /{print} NF==0{f=1}' "$f")
  [ "$ok" = 1 ] || { if [ "$found" = 1 ]; then bad - "$label: bad signature"; else bad - "$label: not signed by the ledger's key"; fi; return; }
  [ "$size" -le "$EXPECT" ] || { bad "$EXPECT" "ledger truncated: $label covers $size records, the ledger holds $EXPECT"; return; }
  [ "${HEAD_AT[$size]}" = "$(awk 'NF==0{exit} /^head /{print substr($0,6)}' "$f")" ] || \
    { bad $((size - 1)) "record $((size - 1)) differs from $label (rewritten, forked, or truncated and re-appended)"; return; }
  [ "$(printf '%s' "$(sed -n 3p "$f")" | base64 -d | od -An -v -tx1 | tr -d ' \n')" = "${ROOT_AT[$size]}" ] || \
    bad $((size - 1)) "Merkle root at size $size differs from $label"
}
for ((c = 0; c < NSTORED && ${#BAD_REASON} == 0; c++)); do check_cp "$c"; done
# a stored checkpoint's size/time/key id columns: as its note says, by the key in force
while [ -z "$BAD_REASON" ] && IFS='|' read -r id csize ctype ckid; do
  nsize=$(sed -n 2p "$TMP/cp$id") kid=
  for ((j = 0; j < NSIGN; j++)); do [ "${SIGN_FROM[j]}" -le "$nsize" ] && kid=${SIGN_ID[j]}; done
  if [ "$csize" != "$nsize" ] || [ "$ctype" != integer ] || [ "$ckid" != "$kid" ]; then
    bad - "stored checkpoint #$id: its size/time/key id columns do not match its signed note"
  fi
done < <(q "SELECT id, size, typeof(time_ns), key_id FROM checkpoint ORDER BY id" 2>/dev/null)
finish_if_bad
if [ -n "$PUB_ID" ]; then
  member=0; for ((j = 0; j < NSIGN; j++)); do [ "${SIGN_ID[j]}" = "$PUB_ID" ] && member=1; done
  [ "$member" = 1 ] || unusable "public key $PUB_ID is not a signing key of this ledger"
fi
for ((c = NSTORED; c < NCP && ${#BAD_REASON} == 0; c++)); do check_cp "$c"; done
# --- saved writer state ----------------------------------------------------------------
if [ -z "$BAD_REASON" ]; then
  [ "$(q "SELECT lower(hex(value)) FROM state WHERE key='frontier'")" = "$(printf '%s' "${STACK[@]}")" ] \
    || bad - "saved Merkle frontier does not match the records"
fi
if [ -z "$BAD_REASON" ] && [ -n "$HMAC_ID" ]; then
  SEP=$(q "SELECT CAST(value AS TEXT) FROM state WHERE key='hmac_epoch'")
  if ! printf '%s' "$SEP" | grep -Eq '^[0-9]+$'; then bad - "saved HMAC epoch is missing or malformed"
  elif [ "$SEP" != "$EPOCH" ] && { [ "$SEALED" != 1 ] || [ "$SEP" != $((EPOCH + 1)) ]; }; then
    bad - "saved HMAC epoch $SEP does not follow the records' epoch $EPOCH"
  elif [ -n "$K0" ]; then
    epoch_key "$SEP"
    [ "$(q "SELECT lower(hex(value)) FROM state WHERE key='hmac_key'")" = "$KEY" ] || bad - "saved HMAC key is not the epoch $SEP key"
  fi
fi

if [ -z "$BAD_REASON" ]; then  # table definitions exactly as docs/ledger-format.md gives them
  case "$SV" in 1) DDL_SHA=2ebe065b677822cd0296faff1e52fb7151443d3d5e6bb40a7de3fc1ff4fbda58 ;;
                2) DDL_SHA=d4974010cc096fe707a4e8a9cd18fb9fc28d620f6c4a5ff975b88fed697b18d4 ;; esac
  [ "$(q "SELECT type || '|' || name || '|' || tbl_name || '|' || coalesce(sql, '-') FROM sqlite_master ORDER BY name" 2>/dev/null \
        | sha256sum | cut -c1-64)" = "$DDL_SHA" ] \
    || bad - "table definitions differ from ledger schema version $SV"
fi
if [ -z "$BAD_REASON" ] && [ "$SV" = 2 ]; then  # the newest record of each ingest source
  for src in journal spool; do
    want=$(q "SELECT max(seq) FROM per WHERE json_valid(CAST(body AS TEXT))
                AND json_extract(CAST(body AS TEXT), '\$.body.source') = '$src'")
    got=$(q "SELECT CAST(value AS TEXT) FROM state WHERE key = 'latest.$src'")
    [ "$got" = "$want" ] || { bad - "saved newest $src record does not match the records"; break; }
  done
  other=$(q "SELECT key FROM state WHERE key LIKE 'latest.%' AND key NOT IN ('latest.journal', 'latest.spool') ORDER BY key LIMIT 1")
  [ -n "$BAD_REASON" ] || [ -z "$other" ] || bad - "unknown saved state '$other'"
fi
if [ -z "$BAD_REASON" ] && [ "$SV" = 2 ]; then  # stored subtrees: exactly those of the records
  touch "$TMP/subtrees"
  [ "$(q "SELECT level || '|' || idx || '|' || lower(hex(hash)) FROM tree" 2>/dev/null | sort)" = "$(sort "$TMP/subtrees")" ] \
    || bad - "stored Merkle subtrees do not match the records"
fi
if [ -z "$BAD_REASON" ]; then
  QC=$(q "PRAGMA integrity_check" 2>&1 | head -1)
  [ "$QC" = ok ] || bad - "SQLite integrity check failed: $QC"
fi

finish_if_bad
echo "$LEDGER: ok, $EXPECT records, head $HEAD, $NCP checkpoints${K0:+, HMAC verified}"
exit 0
