"""Client code shared by processors: OpenAI calls and error mapping, Supabase, the AI budget."""
