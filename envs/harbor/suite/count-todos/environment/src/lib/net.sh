fetch() {
  echo fetch
}
