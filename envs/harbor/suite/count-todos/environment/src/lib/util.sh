helper() {
  # TODO: handle errors
  true
}
