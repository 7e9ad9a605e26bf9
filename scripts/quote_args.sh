# Sourced by the report scripts: quote_args ARG... prints the arguments as one shell command line,
# each quoted only where the shell needs it, for a report to show the command that made it.
# Example: quote_args a 'b c' "it's" -> a 'b c' it\'s
quote_args() {
  local arg out=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./=,:+-]+$ ]]; then
      out+=" $arg"
    elif [[ "$arg" != *"'"* ]]; then
      out+=" '$arg'"
    else
      out+=" $(printf %q "$arg")"
    fi
  done
  echo "${out# }"
}
