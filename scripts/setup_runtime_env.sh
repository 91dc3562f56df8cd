# Runtime environment for reproducible difftrain runs. Source it into your shell:
#
#     source ./scripts/setup_runtime_env.sh
#
# Sets the determinism and quiet-Hub variables, keeps the official Hugging Face endpoint, and
# falls back to the mirror only when the official one does not answer within a few seconds.
# Safe under `set -eu` and when sourced more than once; prints what it set.

difftrain_set_env() {
    # $1 name, $2 value: export and report, keeping a value the user already chose.
    local name="$1" value="$2" current
    eval "current=\${$name:-}"
    if [ -n "$current" ]; then
        printf '  %s=%s (kept)\n' "$name" "$current"
    else
        export "$name=$value"
        printf '  %s=%s\n' "$name" "$value"
    fi
}

echo "difftrain runtime environment:"
difftrain_set_env CUBLAS_WORKSPACE_CONFIG ":4096:8"
difftrain_set_env PYTHONHASHSEED "0"
difftrain_set_env TOKENIZERS_PARALLELISM "false"
difftrain_set_env HF_HUB_DISABLE_TELEMETRY "1"

case "$(printf '%s' "${HF_HUB_OFFLINE:-}${TRANSFORMERS_OFFLINE:-}" | tr '[:upper:]' '[:lower:]')" in
    *1*|*true*|*yes*|*on*)
        echo "  offline mode is on: Hub endpoint not checked" ;;
    *)
        if [ -n "${HF_ENDPOINT:-}" ]; then
            printf '  HF_ENDPOINT=%s (kept)\n' "$HF_ENDPOINT"
        elif ! command -v curl >/dev/null 2>&1; then
            echo "  curl not found: keeping the official Hub endpoint unchecked"
        elif curl -fsSIL --max-time 5 https://huggingface.co >/dev/null 2>&1; then
            echo "  Hub endpoint: https://huggingface.co (reachable)"
        else
            export HF_ENDPOINT=https://hf-mirror.com
            echo "  HF_ENDPOINT=$HF_ENDPOINT (official endpoint unreachable, using the mirror)"
        fi ;;
esac
unset -f difftrain_set_env
