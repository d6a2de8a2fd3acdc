//! `#[derive(ShmSafe)]` for `context-shmem`.
//!
//! The derive accepts only structs that are `#[repr(C)]` (or `#[repr(transparent)]`), have no
//! generic parameters, and whose every field type implements `context_shmem::ShmSafe`; it also
//! asserts at compile time that the struct has no padding (its size is the sum of its fields'
//! sizes). Anything else is a compile error. The compile_fail doctests on
//! `context_shmem::ShmSafe` pin these refusals.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput, Fields, parse_macro_input};

/// Derives `context_shmem::ShmSafe` (see the crate docs for the conditions).
#[proc_macro_derive(ShmSafe)]
pub fn derive_shm_safe(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn has_stable_repr(input: &DeriveInput) -> syn::Result<bool> {
    let mut ok = false;
    for attr in &input.attrs {
        if !attr.path().is_ident("repr") {
            continue;
        }
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("C") || meta.path.is_ident("transparent") {
                ok = true;
            } else if meta.input.peek(syn::token::Paren) {
                // e.g. align(8) or packed(2): consume the argument.
                let content;
                syn::parenthesized!(content in meta.input);
                let _: proc_macro2::TokenStream = content.parse()?;
            }
            Ok(())
        })?;
    }
    Ok(ok)
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let name = &input.ident;
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &input.generics,
            "ShmSafe cannot be derived for generic types",
        ));
    }
    let data = match &input.data {
        Data::Struct(s) => s,
        _ => {
            return Err(syn::Error::new_spanned(
                name,
                "ShmSafe can only be derived for structs (enums and unions have invalid bit patterns)",
            ));
        }
    };
    if !has_stable_repr(input)? {
        return Err(syn::Error::new_spanned(
            name,
            "ShmSafe requires #[repr(C)] or #[repr(transparent)]: the layout must be the same in every process",
        ));
    }
    let tys: Vec<&syn::Type> = match &data.fields {
        Fields::Named(f) => f.named.iter().map(|f| &f.ty).collect(),
        Fields::Unnamed(f) => f.unnamed.iter().map(|f| &f.ty).collect(),
        Fields::Unit => Vec::new(),
    };
    Ok(quote! {
        const _: () = {
            fn __assert_field_is_shm_safe<T: ::context_shmem::ShmSafe>() {}
            #[allow(dead_code)]
            fn __assert_fields() {
                #( __assert_field_is_shm_safe::<#tys>(); )*
            }
            assert!(
                ::core::mem::size_of::<#name>() == 0 #( + ::core::mem::size_of::<#tys>() )*,
                "ShmSafe types must not contain padding: reorder fields or add explicit padding fields",
            );
        };
        // SAFETY: checked above at compile time: #[repr(C)]/#[repr(transparent)], no padding, and
        // every field is ShmSafe (pointer-free, every bit pattern valid), so the struct is too.
        unsafe impl ::context_shmem::ShmSafe for #name {}
    })
}
