"""What people see: the chat assistant and Model chat behind the app, run views, uploads, CLI progress and
quiet output."""
